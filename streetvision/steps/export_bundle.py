"""Phase 6, ``export_bundle``: model + exactly one policy + splits as a portable, verified bundle.

The bundle directory holds the files, ``bundle.json`` (relative paths, checksums, lineage, held-out
metrics) and, as every step, ``manifest.json`` last. ``val_test`` is read here, to evaluate, and nowhere
that fits anything. Never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Optional

import numpy as np

from streetvision.bundle import (
    BUNDLE_FILE,
    BUNDLE_SCHEMA,
    POLICY_TYPES,
    BundleError,
    apply_policy,
    check_bundle,
    check_threshold,
    served_probability,
)
from streetvision.config import read_json, require, to_dict, to_yaml
from streetvision.eval import views
from streetvision.eval.metrics import compute_all_metrics, subnet_reward
from streetvision.eval.report import level_table
from streetvision.eval.views import VIEWS
from streetvision.io.manifests import Manifest, code_version, input_record, manifest_sha256, verify_dir
from streetvision.io.outputs import StepOutputs
from streetvision.steps.make_splits import SPLITS_FILE

STEP = "export_bundle"
REPORT_FILE = "report.md"
# Each policy step and the one file it commits. The file's own policy_type must agree.
MODEL_FIELDS = (
    "backbone",
    "architecture",
    "num_classes",
    "class_names",
    "preprocessing",
    "decode_min_side",
    "logit_columns",
    "dropout",
)
POLICY_FILES = {"threshold": "thresholds.json", "gate": "gateparams.json", "scrc": "scrcparams.json"}


@dataclass
class ExportConfig:
    min_test_mcc: Optional[float] = None  # noqa: UP045 - release gate on held-out MCC (OmegaConf reads Optional)


@dataclass
class Config:
    export: ExportConfig = field(default_factory=ExportConfig)

    def check(self) -> None:
        gate = self.export.min_test_mcc
        require(gate is None or -1 <= gate <= 1, "export.min_test_mcc", gate, "an MCC in [-1, 1], or null")


def find_policy(policy_dir: Path) -> tuple[str, str, dict[str, Any]]:
    """(type, file name, content) of the one policy in a policy step's directory."""
    present = [name for name in POLICY_FILES.values() if (policy_dir / name).is_file()]
    if not present:
        raise BundleError(
            f"{policy_dir}: no policy file (expected one of {', '.join(POLICY_FILES.values())})"
        )
    if len(present) > 1:
        raise BundleError(
            f"{policy_dir}: {len(present)} policies ({', '.join(present)}); exactly one must be chosen"
        )
    content = read_json(policy_dir / present[0], BundleError)
    kind = content.get("policy_type")
    if kind not in POLICY_TYPES:
        raise BundleError(
            f"{policy_dir / present[0]}: unknown policy_type {kind!r} (known: {', '.join(POLICY_TYPES)})"
        )
    if POLICY_FILES[kind] != present[0]:
        raise BundleError(f"{policy_dir / present[0]}: policy_type {kind!r} does not belong in this file")
    check_threshold(content.get("threshold"), str(policy_dir / present[0]))
    return kind, present[0], content


def check_lineage(what: str, manifest: Manifest, name: str, upstream: Path, uri: str) -> None:
    """Refuse inputs that do not belong together: ``manifest`` must record ``upstream`` as its ``name``."""
    recorded = manifest.inputs.get(name, {}).get("manifest_sha256")
    actual = manifest_sha256(upstream)
    if recorded != actual:
        raise BundleError(
            f"{what} was made from a {name} whose manifest is {str(recorded)[:12]}, "
            f"but --{name} {uri} has manifest {actual[:12]}; they do not belong together"
        )


def held_out(phase1: Path, kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """val_test, per view phase 1 has (clean; challenge, also per level): the policy's metrics, and the
    subnet reward simulated for the served probability and, for comparison, the raw one cut at 0.5."""
    report: dict[str, Any] = {}
    for view in VIEWS:
        try:
            s = views.load(phase1, "val_test", view)
        except views.ViewError:
            if view == "clean":
                raise
            continue  # phase 1 made no challenge views
        decided = apply_policy(kind, params, s.scores)
        served = served_probability(s.scores, params["threshold"])
        if not np.array_equal(np.round(served) == 1, decided == 1):  # what the validator reads
            raise BundleError("the served probability does not reproduce the policy's decisions")
        report[view] = {
            "metrics": {
                **compute_all_metrics(s.labels, decided),
                "n": int(len(s.labels)),
                "images": s.images,
            },
            "by_level": {
                f"level_{v}": compute_all_metrics(s.labels[m], decided[m]) for v, m in s.by_level().items()
            },
            "reward": {
                "served": subnet_reward(s.labels, served),
                "raw": subnet_reward(s.labels, s.scores),
            },
        }
    return report


def held_out_markdown(bundle: dict[str, Any]) -> str:
    """The bundle's held-out report (val_test): metrics per view and level, and the simulated reward."""
    t = bundle["policy"]["params"]["threshold"]
    lines = [
        "# Held-out evaluation (val_test)",
        "",
        f"Policy: roadwork when P(roadwork) >= {t:.6f}, fitted on val_calib "
        f"({bundle['test_metrics']['views']} views). Subnet reward: the validator's formula, "
        f"(0.5·max(0, MCC over 100) + 0.5·accuracy over 10)^3, simulated over val_test (50/50 labels).",
        "",
        "| view | images | rows | mcc | accuracy | fnr | fpr | reward (served) | reward (raw p, cut 0.5) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for view, r in bundle["held_out"].items():
        m = r["metrics"]
        lines.append(
            f"| {view} | {m['images']} | {m['n']} | {m['mcc']:.4f} | {m['accuracy']:.4f} | {m['fnr']:.4f} | "
            f"{m['fpr']:.4f} | {r['reward']['served']['reward']:.4f} | {r['reward']['raw']['reward']:.4f} |"
        )
    lines.append("")
    for view, r in bundle["held_out"].items():
        if r["by_level"]:
            lines += [f"## {view} views by level", "", *level_table(r["by_level"])]
    return "\n".join(lines)


def ui_outputs(out: Path) -> dict[str, Any]:
    """What the Kubeflow UI shows of a committed bundle besides its metrics: the held-out report."""
    return {"report": REPORT_FILE}


def run(
    config: Config,
    *,
    phase1: Path,
    policy: Path,
    splits: Path,
    out: Path,
    sources: dict[str, str] | None = None,
    run_id: str | None = None,
    task: str = "",
) -> Manifest:
    src = {"phase1": str(phase1), "policy": str(policy), "splits": str(splits), **(sources or {})}
    p1_manifest = verify_dir(phase1, "train_baseline")
    policy_manifest = verify_dir(policy, "sweep_thresholds")
    verify_dir(splits, "make_splits")
    check_lineage(f"--policy {src['policy']}", policy_manifest, "phase1", phase1, src["phase1"])
    check_lineage(f"--phase1 {src['phase1']}", p1_manifest, "splits", splits, src["splits"])
    kind, policy_file, policy_content = find_policy(policy)
    model_info = read_json(phase1 / "model.json", BundleError)
    if missing := [k for k in MODEL_FIELDS if k not in model_info]:
        raise BundleError(f"{phase1 / 'model.json'}: missing field(s) {', '.join(missing)}")

    params = {"threshold": policy_content["threshold"]}
    report = held_out(phase1, kind, params)
    calibrated_on = policy_content.get("views", "clean")
    if calibrated_on not in report:
        raise BundleError(f"{phase1}: no {calibrated_on} views of val_test, which the policy was fitted on")
    test = report[calibrated_on]["metrics"]
    gate = config.export.min_test_mcc
    if gate is not None and test["mcc"] < gate:
        raise BundleError(
            f"release gate: held-out val_test MCC {test['mcc']:.4f} < export.min_test_mcc {gate} "
            f"({calibrated_on} views, n={test['n']}); no bundle written"
        )

    with StepOutputs(out, STEP) as outputs:
        for name, source in (
            ("model.safetensors", phase1 / "model.safetensors"),
            ("model.json", phase1 / "model.json"),
            (policy_file, policy / policy_file),
            (SPLITS_FILE, splits / SPLITS_FILE),
        ):
            outputs.copy(name, source)
        files = {n: {"sha256": w.sha256, "size": w.size} for n, w in outputs.files.items()}
        lineage = {
            "phase1": input_record(phase1, src["phase1"]),
            "policy": input_record(policy, src["policy"]),
            "splits": input_record(splits, src["splits"]),
            "dataset": p1_manifest.inputs.get("dataset", {}),
        }
        bundle = {
            "schema_version": BUNDLE_SCHEMA,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "code_version": code_version(),
            "backbone": model_info["backbone"],
            "num_classes": model_info["num_classes"],
            "class_names": model_info["class_names"],
            "preprocessing": model_info["preprocessing"],
            "decode_min_side": model_info["decode_min_side"],
            "model": {
                "weights": "model.safetensors",
                "config": "model.json",
                "logit_columns": model_info["logit_columns"],
                "architecture": model_info["architecture"],
                "dropout": model_info["dropout"],
            },
            "policy": {
                "type": kind,
                "file": policy_file,
                "params": {"threshold": policy_content["threshold"]},
            },
            "splits": SPLITS_FILE,
            "files": files,
            "test_metrics": {**test, "split": "val_test", "views": calibrated_on},
            "held_out": report,
            "lineage": lineage,
        }
        outputs.write_json(BUNDLE_FILE, bundle)
        outputs.write_text(REPORT_FILE, held_out_markdown(bundle))
        outputs.write_text("config.yaml", to_yaml(config))
        check_bundle(outputs.root)  # what a loader will check, checked before the manifest commits it
        return outputs.commit(
            config=to_dict(config),
            inputs=lineage,
            metrics={
                **{f"test_{k}": v for k, v in test.items()},
                **{f"{view}_subnet_reward": r["reward"]["served"]["reward"] for view, r in report.items()},
                **{f"{view}_mcc": r["metrics"]["mcc"] for view, r in report.items()},
            },
            run_id=run_id,
            task=task,
            extra={"policy_type": kind},
        )
