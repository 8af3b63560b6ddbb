"""The sweep report: two PNG plots and a Markdown summary (matplotlib, headless)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from streetvision.eval.metrics import RATE_NAMES


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def plots(
    thresholds: np.ndarray,
    mcc: np.ndarray,
    chosen: float,
    chosen_mcc: float,
    coverage: np.ndarray,
    risk: np.ndarray,
) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    ax.step(thresholds, mcc, where="post", lw=1.2, label="MCC (val_calib)")
    ax.plot(
        [chosen], [chosen_mcc], "o", color="tab:red", label=f"policy t={chosen:.4f}, MCC={chosen_mcc:.3f}"
    )
    ax.set(xlabel="threshold on P(roadwork)", ylabel="MCC", xlim=(0, 1), title="MCC vs threshold")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center")
    fig.tight_layout()
    mcc_png = _png(fig)

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    ax.step(coverage, risk, where="post", lw=1.2)
    ax.set(
        xlabel="coverage",
        ylabel="selective risk",
        xlim=(0, 1),
        title="Risk-coverage (confidence = max(served, 1 - served))",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return {"mcc_vs_threshold.png": mcc_png, "risk_coverage.png": _png(fig)}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def markdown(
    policy: dict[str, Any], aurc: float, e_aurc: float, table: list[dict[str, Any]], images: dict[str, str]
) -> str:
    """The report; ``images`` maps each plot's file name to how the report links it."""
    m = policy["metrics"]
    source = (
        f"{policy['n']} validator-style challenge views of {policy['images']} calibration images"
        if policy.get("views") == "challenge"
        else f"{policy['n']} calibration images"
    )
    lines = [
        "# Threshold sweep (val_calib)",
        "",
        f"Policy: predict roadwork when P(roadwork) >= **{policy['threshold']:.6f}** "
        f"(max MCC{', constrained by ' + str(policy['constraint']) if policy['constraint'] else ''}), "
        f"from {source} ({policy['n_positive']} roadwork).",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {_fmt(m[k])} |" for k in RATE_NAMES),
        f"| confusion (tp / fp / tn / fn) | {m['tp']} / {m['fp']} / {m['tn']} / {m['fn']} |",
        f"| AURC / E-AURC | {aurc:.4f} / {e_aurc:.4f} |",
        "",
        *level_table(policy.get("by_level", {})),
        f"![MCC vs threshold]({images['mcc_vs_threshold.png']})",
        "",
        f"![Risk-coverage]({images['risk_coverage.png']})",
        "",
        "## Selective prediction (accept when confidence >= threshold)",
        "",
        "Confidence is max(served, 1 - served), the served probability putting the decision threshold at 0.5.",
        "",
        "| threshold | coverage | selective_accuracy | selective_risk | num_accepted |",
        "|---|---|---|---|---|",
        *(
            f"| {r['threshold']:.2f} | {r['coverage']:.4f} | {_fmt(r['selective_accuracy'])} | "
            f"{_fmt(r['selective_risk'])} | {r['num_accepted']} |"
            for r in table
        ),
        "",
    ]
    return "\n".join(lines)


def level_table(by_level: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows of metrics per challenge level (nothing when there are none)."""
    if not by_level:
        return []
    return [
        "| challenge level | n | mcc | accuracy | fnr | fpr |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name.removeprefix('level_')} | {m['tp'] + m['tn'] + m['fp'] + m['fn']} | {m['mcc']:.4f} | "
            f"{m['accuracy']:.4f} | {m['fnr']:.4f} | {m['fpr']:.4f} |"
            for name, m in by_level.items()
        ),
        "",
    ]
