"""export_bundle, ``export_bundle``: model + exactly one policy + splits as a portable, verified bundle.

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
    GATE_FILES,
    POLICY_PARAMS,
    BundleError,
    check_bundle,
    check_policy_params,
    policy_outputs,
)
from streetvision.config import read_json, require
from streetvision.eval import views
from streetvision.eval.metrics import compute_all_metrics, subnet_reward
from streetvision.eval.report import level_table
from streetvision.eval.views import VIEWS
from streetvision.io.manifests import Manifest, code_version
from streetvision.io.outputs import StepOutputs
from streetvision.phases import choices
from streetvision.steps import commit, start
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
POLICY_FILES = {"threshold": "thresholds.json", "scrc": "scrc.json"}  # what each policy step commits
POLICY_STEPS = choices("export_bundle", "policy")  # export.policy -> the phase that commits that policy


@dataclass
class ExportConfig:
    min_test_mcc: Optional[float] = None  # noqa: UP045 - release gate on held-out MCC (OmegaConf reads Optional)
    policy: str = "threshold"  # the one policy to ship: threshold (sweep_thresholds) or scrc (calibrate_scrc)


@dataclass
class Config:
    export: ExportConfig = field(default_factory=ExportConfig)

    def check(self) -> None:
        gate = self.export.min_test_mcc
        require(gate is None or -1 <= gate <= 1, "export.min_test_mcc", gate, "an MCC in [-1, 1], or null")
        require(
            self.export.policy in POLICY_STEPS, "export.policy", self.export.policy, ", ".join(POLICY_STEPS)
        )


def find_policy(policy_dir: Path, kind: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(file name, content, the parameters a bundle carries) of the ``kind`` policy in a policy step's
    directory."""
    name = POLICY_FILES[kind]
    if not (policy_dir / name).is_file():
        raise BundleError(
            f"{policy_dir}: no {name}; export.policy={kind} needs the {POLICY_STEPS[kind]} output"
        )
    content = read_json(policy_dir / name, BundleError)
    if content.get("policy_type") != kind:
        raise BundleError(f"{policy_dir / name}: policy_type {content.get('policy_type')!r} is not {kind!r}")
    params = {k: content.get(k) for k in POLICY_PARAMS[kind]}
    check_policy_params(kind, params, str(policy_dir / name))
    return name, content, params


def held_out(baseline: Path, kind: str, params: dict[str, Any], policy_dir: Path) -> dict[str, Any]:
    """val_test, per view train_baseline has (clean; challenge, also per level): the policy's metrics, and the
    subnet reward simulated for the served probability and, for comparison, the raw one cut at 0.5."""
    report: dict[str, Any] = {}
    gated = params.get("confidence") == "gate"
    for view in VIEWS:
        try:
            s = views.load(baseline, "val_test", view)
        except views.ViewError:
            if view == "clean":
                raise
            continue  # train_baseline made no challenge views
        gate = views.load_gate(policy_dir, "val_test", view, len(s.scores)) if gated else None
        out = policy_outputs(kind, params, s.scores, gate)
        decided, served, answered = out["decision"], out["served"], out["answered"]
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
        if kind == "scrc":
            report[view]["selective"] = selective_metrics(s.labels, decided, answered, params)
    return report


def selective_metrics(labels, decided, answered, params: dict[str, Any]) -> dict[str, Any]:
    """What an scrc policy does on held-out images: coverage, the risk among answered images, the FNR among
    answered roadwork images, and the loss it controls (realised) next to alpha."""
    wrong = labels != decided
    missed = (labels == 1) & (decided == 0)
    roadwork = answered & (labels == 1)
    selective_risk = float(wrong[answered].mean()) if answered.any() else 0.0
    fnr_answered = float(missed[roadwork].mean()) if roadwork.any() else 0.0
    if params["delta"] is None:  # CRC bounds the loss's expectation over all images
        realised = float((answered & (wrong if params["risk"] == "error" else missed)).mean())
    else:  # Learn then Test bounds the risk among answered (roadwork) images
        realised = selective_risk if params["risk"] == "error" else fnr_answered
    return {
        "coverage": float(answered.mean()),
        "answered": int(answered.sum()),
        "selective_risk": selective_risk,
        "fnr_answered": fnr_answered,
        "realised_risk": realised,
        "alpha": params["alpha"],
        "delta": params["delta"],
        "risk": params["risk"],
    }


def held_out_markdown(bundle: dict[str, Any]) -> str:
    """The bundle's held-out report (val_test): metrics per view and level, and the simulated reward."""
    params = bundle["policy"]["params"]
    if bundle["policy"]["type"] == "scrc":
        confidence = "|2·served − 1|" if params["confidence"] == "margin" else "the gate's P(decision right)"
        rule = (
            f"roadwork when sigmoid(logit / {params['temperature']:.4f}) >= {params['threshold']:.6f}, "
            f"answered when {confidence} >= {params['lambda']:.4f} (else defer)"
        )
    else:
        rule = f"roadwork when P(roadwork) >= {params['threshold']:.6f}"
    lines = [
        "# Held-out evaluation (val_test)",
        "",
        f"Policy: {rule}, fitted on val_calib "
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
        if sel := r.get("selective"):
            lines += [
                f"Selective ({view}): answers {sel['coverage']:.1%} ({sel['answered']} of {r['metrics']['n']}); "
                f"error rate among answered {sel['selective_risk']:.4f}, FNR among answered roadwork "
                f"{sel['fnr_answered']:.4f}; controlled {sel['risk']} risk realised {sel['realised_risk']:.4f} "
                f"vs alpha {sel['alpha']}.",
                "",
            ]
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
    baseline: Path,
    policy: Path,
    splits: Path,
    out: Path,
    sources: dict[str, str] | None = None,
    run_id: str | None = None,
    task: str = "",
) -> Manifest:
    inputs = start(STEP, config, {"baseline": baseline, "policy": policy, "splits": splits}, sources)
    kind = config.export.policy
    policy_file, policy_content, params = find_policy(policy, kind)
    gated = params.get("confidence") == "gate"
    model_info = read_json(baseline / "model.json", BundleError)
    if missing := [k for k in MODEL_FIELDS if k not in model_info]:
        raise BundleError(f"{baseline / 'model.json'}: missing field(s) {', '.join(missing)}")

    report = held_out(baseline, kind, params, policy)
    calibrated_on = policy_content.get("views", "clean")
    if calibrated_on not in report:
        raise BundleError(f"{baseline}: no {calibrated_on} views of val_test, which the policy was fitted on")
    test = report[calibrated_on]["metrics"]
    gate = config.export.min_test_mcc
    if gate is not None and test["mcc"] < gate:
        raise BundleError(
            f"release gate: held-out val_test MCC {test['mcc']:.4f} < export.min_test_mcc {gate} "
            f"({calibrated_on} views, n={test['n']}); no bundle written"
        )

    with StepOutputs(out, STEP) as outputs:
        for name, source in (
            ("model.safetensors", baseline / "model.safetensors"),
            ("model.json", baseline / "model.json"),
            (policy_file, policy / policy_file),
            (SPLITS_FILE, splits / SPLITS_FILE),
            *((name, policy / name) for name in (GATE_FILES.values() if gated else ())),
        ):
            outputs.copy(name, source)
        lineage = inputs.records() | {"dataset": inputs.manifests["baseline"].inputs.get("dataset", {})}
        bundle = {
            "schema_version": BUNDLE_SCHEMA,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "code_version": code_version(),
            **{
                k: model_info[k]
                for k in ("backbone", "num_classes", "class_names", "preprocessing", "decode_min_side")
            },
            "model": {
                "weights": "model.safetensors",
                "config": "model.json",
                **{k: model_info[k] for k in ("logit_columns", "architecture", "dropout")},
            },
            "policy": {
                "type": kind,
                "file": policy_file,
                "params": params,
                **({"gate": dict(GATE_FILES)} if gated else {}),
            },
            "splits": SPLITS_FILE,
            "files": {n: {"sha256": w.sha256, "size": w.size} for n, w in outputs.files.items()},
            "test_metrics": {
                **test,
                "split": "val_test",
                "views": calibrated_on,
                **({"selective": report[calibrated_on]["selective"]} if kind == "scrc" else {}),
            },
            "held_out": report,
            "lineage": lineage,
        }
        outputs.write_json(BUNDLE_FILE, bundle)
        outputs.write_text(REPORT_FILE, held_out_markdown(bundle))
        check_bundle(outputs.root)  # what a loader will check, checked before the manifest commits it
        return commit(outputs, config, lineage, _metrics(report, calibrated_on), run_id=run_id, task=task,
                      extra={"policy_type": kind})  # fmt: skip


def _metrics(report: dict[str, Any], calibrated_on: str) -> dict[str, Any]:
    """The manifest's metrics: val_test's in the view the policy was fitted on, and each view's reward."""
    return {
        **{f"test_{k}": v for k, v in report[calibrated_on]["metrics"].items()},
        **{f"{view}_subnet_reward": r["reward"]["served"]["reward"] for view, r in report.items()},
        **{f"{view}_raw_subnet_reward": r["reward"]["raw"]["reward"] for view, r in report.items()},
        **{f"{view}_mcc": r["metrics"]["mcc"] for view, r in report.items()},
        **{
            f"test_{k}": v
            for k, v in report[calibrated_on].get("selective", {}).items()
            if k in ("coverage", "selective_risk", "fnr_answered", "realised_risk")
        },
    }
