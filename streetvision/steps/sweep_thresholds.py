"""sweep_thresholds, ``sweep_thresholds``: the max-MCC threshold policy from val_calib, with its sweep and report.

Reads only the val_calib logits and labels of a verified train_baseline directory; never imports torch.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from streetvision.bundle import served_probability
from streetvision.config import probability, require
from streetvision.eval import report, sweep, views
from streetvision.eval.metrics import RATE_NAMES, compute_all_metrics
from streetvision.eval.views import VIEWS
from streetvision.io.manifests import Manifest
from streetvision.io.outputs import StepOutputs
from streetvision.steps import commit, start

STEP = "sweep_thresholds"
POLICY_FILE = "thresholds.json"
SPLIT = "val_calib"


@dataclass
class SweepConfig:
    """How the threshold policy is chosen: the objective, what it is fitted on, the constraints."""

    optimize: str = "mcc"
    # What the threshold is fitted on: val_calib's images as they are (clean), or train_baseline's
    # validator-style challenge views of them (challenge: what a subnet miner is asked about).
    views: str = "challenge"
    max_fnr: Optional[float] = None  # noqa: UP045 - OmegaConf reads Optional, not X | None
    max_fpr: Optional[float] = None  # noqa: UP045
    min_precision: Optional[float] = None  # noqa: UP045


@dataclass
class Config:
    sweep: SweepConfig = field(default_factory=SweepConfig)
    roc_points: int = 200  # ROC points kept for the Kubeflow UI

    def check(self) -> None:
        p = self.sweep
        require(p.optimize == "mcc", "sweep.optimize", p.optimize, "only 'mcc' is supported")
        require(p.views in VIEWS, "sweep.views", p.views, ", ".join(VIEWS))
        for key in ("max_fnr", "max_fpr", "min_precision"):
            probability(f"sweep.{key}", getattr(p, key))
        require(self.roc_points >= 2, "roc_points", self.roc_points, "at least 2")


def _csv(header: list[str], columns: list[np.ndarray], fmt: str) -> str:
    buf = io.StringIO()
    np.savetxt(buf, np.column_stack(columns), delimiter=",", header=",".join(header), comments="", fmt=fmt)
    return buf.getvalue()


def ui_outputs(out: Path) -> dict[str, Any]:
    """What the Kubeflow UI shows of a committed sweep: the confusion matrix at the policy threshold with
    thinned ROC points, and the report with its plots inlined."""
    from streetvision.config import read_json
    from streetvision.kfp_executor import confusion_and_roc

    policy, roc = read_json(out / POLICY_FILE), read_json(out / "roc.json")
    return {"classification": confusion_and_roc(policy["metrics"], roc), "report": "report_inline.md"}


def run(
    config: Config,
    *,
    baseline: Path,
    out: Path,
    sources: dict[str, str] | None = None,
    run_id: str | None = None,
    task: str = "",
) -> Manifest:
    if config.sweep.optimize != "mcc":
        raise sweep.SweepError(f"sweep.optimize={config.sweep.optimize!r}: only 'mcc' is supported")
    inputs = start(STEP, config, {"baseline": baseline}, sources)  # before anything is read
    calib = views.load(baseline, SPLIT, config.sweep.views)
    scores, labels = calib.scores, calib.labels
    curve = sweep.exact_sweep(scores, labels)
    constraint = sweep.Constraint(config.sweep.max_fnr, config.sweep.max_fpr, config.sweep.min_precision)
    threshold, k = sweep.choose_threshold(curve, constraint)
    predicted = sweep.decide(scores, threshold)
    at = compute_all_metrics(labels, predicted)
    # Confidence in the decision actually made: the margin from the threshold, as the served probability
    # (threshold at 0.5) expresses it; max(p, 1 - p) would call scores just below a low threshold sure.
    served = served_probability(scores, threshold)
    confidence = np.maximum(served, 1 - served)
    rc = sweep.risk_coverage(confidence, predicted == labels)
    table = sweep.selective_table(confidence, predicted == labels)
    policy = {
        "policy_type": "threshold",
        "threshold": threshold,
        "score": "P(roadwork): sigmoid of the logit (softmax class 1 for two logits)",
        "decision": "roadwork when score >= threshold",
        "optimize": "mcc",
        "constraint": constraint.active(),
        "metrics": at,
        "n": int(len(labels)),
        "n_positive": int(labels.sum()),
        "split": SPLIT,
        "views": config.sweep.views,
        "images": calib.images,
        "selected_score": float(curve.thresholds[k]),
        "by_level": {
            f"level_{v}": compute_all_metrics(labels[m], predicted[m]) for v, m in calib.by_level().items()
        },
    }
    with StepOutputs(out, STEP) as outputs:
        outputs.write_json(POLICY_FILE, policy)
        _write_curves(outputs, config, curve, rc, table, policy)
        metrics = {k: at[k] for k in ("mcc", "accuracy", "fnr", "fpr")}
        return commit(outputs, config, inputs.records(),
                      {"threshold": threshold, **metrics, "aurc": rc.aurc, "e_aurc": rc.e_aurc, "n": int(len(labels))},
                      run_id=run_id, task=task)  # fmt: skip


def _write_curves(outputs: StepOutputs, config: Config, curve, rc, table, policy: dict[str, Any]) -> None:
    """The sweep, risk-coverage and ROC curves, their plots and the report (also with the plots inlined)."""
    m = curve.metrics()
    roc = sweep.thin(len(curve.thresholds), config.roc_points)
    outputs.write_text(
        "sweep.csv",
        _csv(
            ["threshold", "tp", "fp", "tn", "fn", *RATE_NAMES],
            [curve.thresholds, curve.tp, curve.fp, curve.tn, curve.fn, *(m[c] for c in RATE_NAMES)],
            "%.10g",
        ),
    )
    outputs.write_text(
        "risk_coverage.csv",
        _csv(["confidence", "coverage", "risk"], [rc.confidence, rc.coverage, rc.risk], "%.10g"),
    )
    outputs.write_json("selective_table.json", table)
    outputs.write_json(
        "roc.json",
        {
            "fpr": m["fpr"][roc].tolist(),
            "tpr": m["recall"][roc].tolist(),
            "threshold": curve.thresholds[roc].tolist(),
        },
    )
    threshold, mcc = policy["threshold"], policy["metrics"]["mcc"]
    pngs = report.plots(curve.thresholds, m["mcc"], threshold, mcc, rc.coverage, rc.risk)
    for name, data in pngs.items():
        outputs.write_bytes(name, data)
    outputs.write_text("report.md", report.markdown(policy, rc.aurc, rc.e_aurc, table, {n: n for n in pngs}))
    # The same report with the plots inlined, for viewers that show one file alone (the Kubeflow UI).
    inline = {n: "data:image/png;base64," + base64.b64encode(d).decode() for n, d in pngs.items()}
    outputs.write_text("report_inline.md", report.markdown(policy, rc.aurc, rc.e_aurc, table, inline))
