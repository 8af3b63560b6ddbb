"""calibrate_scrc, ``calibrate_scrc``: temperature scaling and selective conformal risk control on val_calib.

Reads only train_baseline's val_calib logits and labels (clean, or one seeded challenge view per image, so the
calibration units stay exchangeable) and, with ``scrc.confidence=gate``, train_gate's gate scores of the
same rows. val_calib's images are split in two by the seed: the first part fits the temperature and the
max-MCC decision threshold on the calibrated probability, the second, untouched by those fits, chooses
the answering threshold lambda on the confidence with the guarantee of ``eval.conformal``: expected risk
<= alpha (``scrc.delta=0``) or risk among answered <= alpha with probability 1 − delta. The confidence
is the margin |2·served − 1| from the decision threshold (the served probability putting it at 0.5), or
the gate's P(decision right), fitted on train and val_select only, so either is fixed before val_calib
is seen. A gate policy carries the gate (weights, description, its val_test scores for the held-out
report) in this step's output. Numpy only; never imports torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streetvision.bundle import GATE_FILES as BUNDLED_GATE
from streetvision.bundle import served_probability
from streetvision.config import require
from streetvision.eval import conformal, sweep, views
from streetvision.eval.metrics import calibration_errors, compute_all_metrics
from streetvision.io.manifests import Manifest
from streetvision.io.outputs import StepOutputs
from streetvision.steps import commit, start

STEP = "calibrate_scrc"
POLICY_FILE = "scrc.json"
SPLIT = "val_calib"
CONFIDENCES = ("margin", "gate")
# What a gate policy carries from train_gate (name here <- name in the train_gate output): what the bundle
# ships, and the val_test scores its held-out report reads.
GATE_FILES = {
    BUNDLED_GATE["weights"]: "gate.safetensors",
    BUNDLED_GATE["config"]: "model.json",
    **{views.gate_file("val_test", v): views.gate_file("val_test", v) for v in views.VIEWS},
}


@dataclass
class ScrcConfig:
    alpha: float = 0.05  # the risk level
    delta: float = 0.0  # 0: in expectation (CRC); in (0, 1): with probability 1 - delta (Learn then Test)
    risk: str = "error"  # error (wrong answers) or fnr (missed roadwork among roadwork answered)
    views: str = "challenge"  # what val_calib is: clean images, or one challenge view per image
    fit_fraction: float = 0.5  # share of val_calib's images that fits the temperature and threshold
    confidence: str = "margin"  # margin (|2·served − 1|) or gate (train_gate's scores; needs --gate)
    seed: int = 0


@dataclass
class Config:
    scrc: ScrcConfig = field(default_factory=ScrcConfig)

    def check(self) -> None:
        s = self.scrc
        require(0 < s.alpha < 1, "scrc.alpha", s.alpha, "a risk level in (0, 1)")
        require(0 <= s.delta < 1, "scrc.delta", s.delta, "0 (in expectation) or in (0, 1)")
        require(s.risk in conformal.RISKS, "scrc.risk", s.risk, ", ".join(conformal.RISKS))
        require(s.views in views.VIEWS, "scrc.views", s.views, ", ".join(views.VIEWS))
        require(0 < s.fit_fraction < 1, "scrc.fit_fraction", s.fit_fraction, "a share in (0, 1)")
        require(s.confidence in CONFIDENCES, "scrc.confidence", s.confidence, ", ".join(CONFIDENCES))
        require(0 <= s.seed < 2**32, "scrc.seed", s.seed, "an integer in [0, 2^32)")


def ui_outputs(out: Path) -> dict[str, Any]:
    return {"report": "report.md"}


def run(
    config: Config,
    *,
    baseline: Path,
    out: Path,
    gate: Path | None = None,
    sources: dict[str, str] | None = None,
    run_id: str | None = None,
    task: str = "",
) -> Manifest:
    c = config.scrc
    inputs = start(STEP, config, {"baseline": baseline, "gate": gate}, sources)
    calib = views.load(baseline, SPLIT, c.views)  # every image once below: a seeded view of it
    # train_gate's scores of val_calib's rows in the same view (scrc.confidence=gate)
    gate_scores = views.load_gate(gate, SPLIT, c.views, len(calib.logits)) if gate is not None else None
    logits, labels = calib.logits, calib.labels
    fit, cal = split_calib(calib.rows, labels, c.fit_fraction, c.seed)

    temperature = conformal.fit_temperature(logits[fit], labels[fit])
    raw, calibrated = calib.scores, sweep.sigmoid(logits / temperature)
    threshold, _ = sweep.choose_threshold(sweep.exact_sweep(calibrated[fit], labels[fit]))
    decisions = sweep.decide(calibrated, threshold)
    margin = np.abs(2 * served_probability(calibrated, threshold) - 1)
    confidence = margin if gate_scores is None else gate_scores

    def selection(score: np.ndarray) -> conformal.Selection:
        if not c.delta:
            return conformal.crc(score[cal], labels[cal], decisions[cal], alpha=c.alpha, risk=c.risk)
        return conformal.ltt(
            score[cal], labels[cal], decisions[cal], alpha=c.alpha, delta=c.delta, risk=c.risk
        )

    select = selection(confidence)
    answered = cal[confidence[cal] >= select.lam]
    policy = _policy(c, temperature, threshold, select, gated=gate_scores is not None) | {
        "n_fit": int(len(fit)),
        "answered_metrics": compute_all_metrics(labels[answered], decisions[answered])
        if len(answered)
        else {},
        # What the margin would have answered at the same alpha on the same part (the gate's worth).
        "margin_coverage": _coverage(selection, margin) if gate_scores is not None else select.coverage,
        "calibration": {
            "before": calibration_errors(raw[cal], labels[cal]),
            "after": calibration_errors(calibrated[cal], labels[cal]),
        },
    }
    rc = sweep.risk_coverage(confidence[cal], decisions[cal] == labels[cal])
    with StepOutputs(out, STEP) as outputs:
        for name, source in GATE_FILES.items() if gate is not None else ():
            if (gate / source).is_file():
                outputs.copy(name, gate / source)
        outputs.write_json(POLICY_FILE, policy)
        outputs.write_bytes("risk_coverage.png", _plot(rc, select))
        outputs.write_text("report.md", _report(policy))
        return commit(outputs, config, inputs.records(), _metrics(policy), run_id=run_id, task=task)


def _policy(c: ScrcConfig, temperature: float, threshold: float, select, *, gated: bool) -> dict[str, Any]:
    """What the bundle serves: the calibrated score, its threshold, and when to answer."""
    return {
        "policy_type": "scrc",
        "temperature": temperature,
        "threshold": threshold,
        "score": "P(roadwork) = sigmoid(logit / temperature)",
        "decision": "roadwork when score >= threshold",
        "confidence": c.confidence,
        "confidence_rule": (
            "the gate's P(decision right) (gate.json, gate.safetensors)"
            if gated
            else "|2 * served - 1|, served: the score remapped so that the threshold is at 0.5"
        ),
        "lambda": select.lam,
        "answer": "answer when confidence >= lambda, else defer",
        "alpha": c.alpha,
        "delta": c.delta or None,
        "risk": c.risk,
        "guarantee": (
            f"P({c.risk} risk among answered > alpha) <= delta (Learn then Test)"
            if c.delta
            else f"E[{c.risk} loss] <= alpha (Conformal Risk Control)"
        ),
        "views": c.views,
        "n": select.n,
        "coverage": select.coverage,
        "risk_on_calibration": select.risk,
    }


def _metrics(policy: dict[str, Any]) -> dict[str, Any]:
    return {
        **{k: policy[k] for k in ("temperature", "threshold", "lambda", "coverage", "margin_coverage")},
        "risk": policy["risk_on_calibration"],
        "alpha": policy["alpha"],
        "ece_before": policy["calibration"]["before"]["ece"],
        "ece_after": policy["calibration"]["after"]["ece"],
        "n": policy["n"],
    }


def split_calib(rows: np.ndarray, labels: np.ndarray, fit_fraction: float, seed: int):
    """(rows that fit the temperature and threshold, rows that calibrate lambda): one seeded view per
    val_calib image, the images shuffled by ``seed`` and cut at ``fit_fraction``. Each image is one unit,
    on one side only."""
    rng = np.random.default_rng(seed)
    images = np.unique(rows)
    one_view = np.array([rng.choice(np.flatnonzero(rows == i)) for i in images])
    shuffled = rng.permutation(len(one_view))
    n_fit = int(round(fit_fraction * len(one_view)))
    fit, cal = one_view[shuffled[:n_fit]], one_view[shuffled[n_fit:]]
    if min(len(fit), len(cal)) < 2 or len(np.unique(labels[fit])) < 2:
        raise conformal.ConformalError(
            f"val_calib has {len(images)} images: too few to fit on {len(fit)} and calibrate on {len(cal)}"
        )
    return fit, cal


def _coverage(selection, score: np.ndarray) -> float | None:
    """The coverage ``selection`` reaches with ``score`` as the confidence; None where alpha is out of reach."""
    try:
        return selection(score).coverage
    except conformal.ConformalError:
        return None


def _plot(rc: sweep.RiskCoverage, select: conformal.Selection) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    ax.step(rc.coverage, rc.risk, where="post", lw=1.2, label="selective risk (calibration part)")
    ax.axvline(
        select.coverage,
        color="tab:red",
        ls="--",
        label=f"lambda={select.lam:.3f}, coverage {select.coverage:.2f}",
    )
    ax.set(xlabel="coverage", ylabel="risk among answered", xlim=(0, 1), title="Risk-coverage")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def _report(policy: dict[str, Any]) -> str:
    b, a = policy["calibration"]["before"], policy["calibration"]["after"]
    return "\n".join(
        [
            "# Selective conformal risk control (val_calib)",
            "",
            f"Guarantee: {policy['guarantee']}, alpha={policy['alpha']}"
            + (f", delta={policy['delta']}" if policy["delta"] is not None else "")
            + f"; {policy['views']} views, {policy['n_fit']} images fit the temperature and threshold, "
            f"{policy['n']} calibrate lambda.",
            "",
            "| | value |",
            "|---|---|",
            f"| temperature | {policy['temperature']:.4f} |",
            f"| decision threshold | {policy['threshold']:.6f} |",
            f"| lambda (answer when confidence >= lambda) | {policy['lambda']:.6f} |",
            f"| confidence | {policy['confidence']} |",
            f"| coverage | {policy['coverage']:.4f} |",
            *(
                [f"| coverage the margin would give at this alpha | {_or_none(policy['margin_coverage'])} |"]
                if policy["confidence"] == "gate"
                else []
            ),
            f"| {policy['risk']} risk on the calibration part | {policy['risk_on_calibration']:.4f} |",
            f"| ECE before / after | {b['ece']:.4f} / {a['ece']:.4f} |",
            f"| MCE before / after | {b['mce']:.4f} / {a['mce']:.4f} |",
            f"| NLL before / after | {b['nll']:.4f} / {a['nll']:.4f} |",
            "",
            "![Risk-coverage](risk_coverage.png)",
            "",
        ]
    )


def _or_none(value: float | None) -> str:
    return "none (alpha out of reach)" if value is None else f"{value:.4f}"
