"""Selective conformal risk control: which images to answer so that the risk of the answers is bounded.

Numpy only. Each calibration image i has a confidence c_i (a gate's score, or the margin from the decision
threshold) and a decision; answering means c_i >= lambda. Two guarantees, both finite-sample, for a new
image exchangeable with the calibration set:

- **Expectation (Conformal Risk Control, Angelopoulos et al., ICLR 2024).** With a loss L_i(lambda) in
  [0, B] that does not increase with lambda,
  ``lambda_hat = inf{lambda : (sum_i L_i(lambda) + B) / (n + 1) <= alpha}`` gives E[L_new(lambda_hat)] <= alpha.
  The losses here are ``error``: L_i = 1{answered and wrong} (the probability that a query gets a wrong
  answer), and ``fnr``: L_i = 1{roadwork, answered, and called no roadwork} (a missed roadwork among
  all queries); B = 1.
- **High probability (Learn then Test, Angelopoulos et al. 2021).** On a grid of thresholds fixed in
  advance, the null "the risk among answered images exceeds alpha" is rejected when the binomial tail
  P(Bin(n_answered, alpha) <= errors) <= delta / grid (Bonferroni); the lowest rejected threshold is
  chosen. Then P(risk among answered > alpha) <= delta, for the selective error rate (``error``) or the FNR
  among answered roadwork images (``fnr``).

Among the feasible thresholds the one answering the most images is chosen. When none is feasible the
caller gets :class:`ConformalError` with the alpha the data supports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from streetvision.errors import StreetVisionError

RISKS = ("error", "fnr")


class ConformalError(StreetVisionError):
    """The requested risk level cannot be guaranteed with this calibration data."""


@dataclass(frozen=True)
class Selection:
    lam: float  # answer when confidence >= lam (inf: answer nothing)
    coverage: float  # fraction of calibration images answered
    risk: float  # the controlled quantity on the calibration set at lam (see select)
    n: int


def _losses(risk: str, wrong: np.ndarray, labels: np.ndarray, decisions: np.ndarray) -> np.ndarray:
    if risk == "error":
        return wrong.astype(np.int64)
    return ((labels == 1) & (decisions == 0)).astype(np.int64)


def _by_confidence(confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, last index of each run of equal confidence) for confidence sorted descending."""
    order = np.argsort(-confidence, kind="stable")
    c = confidence[order]
    last = np.flatnonzero(np.r_[c[1:] != c[:-1], True])
    return order, last


def crc(confidence, labels, decisions, *, alpha: float, risk: str = "error") -> Selection:
    """Expectation-controlled selection (Conformal Risk Control, B = 1)."""
    confidence, labels, decisions = _check(confidence, labels, decisions, alpha, risk)
    n = len(confidence)
    loss = _losses(risk, labels != decisions, labels, decisions)
    order, last = _by_confidence(confidence)
    answered_loss = np.cumsum(loss[order])[last]  # answering everything at or above each distinct confidence
    ok = (answered_loss + 1) / (n + 1) <= alpha
    if not (1 / (n + 1) <= alpha):
        raise ConformalError(
            f"alpha={alpha} needs at least {math.ceil(1 / alpha) - 1} calibration images; there are {n}"
        )
    # Feasible lambdas form a top segment (the loss does not increase with lambda): the longest prefix.
    k = int(np.argmin(ok)) if not ok.all() else len(ok)
    if k == 0:
        supported = float((answered_loss[0] + 1) / (n + 1))
        raise ConformalError(
            f"no confidence threshold answers any image at {risk} risk alpha={alpha}: answering even the most "
            f"confident image gives {supported:.4f} (n={n}); the data supports alpha >= {supported:.4f}"
        )
    idx = last[k - 1]
    lam = float(confidence[order][idx])
    return Selection(lam, (idx + 1) / n, float(answered_loss[k - 1] / n), n)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= k), summed in log space (numpy only, no scipy)."""
    if k >= n:
        return 1.0
    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0
    j = np.arange(k + 1)
    log_terms = (
        np.array([math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1) for x in j])
        + j * math.log(p)
        + (n - j) * math.log1p(-p)
    )
    top = log_terms.max()
    return float(min(1.0, math.exp(top) * np.exp(log_terms - top).sum()))


GRID = 20  # candidate thresholds for the high-probability version: 0, 1/20, ..., 19/20 (fixed in advance)


def ltt(
    confidence, labels, decisions, *, alpha: float, delta: float, risk: str = "error", grid: int = GRID
) -> Selection:
    """High-probability selection: P(risk among answered > alpha) <= delta.

    Learn then Test over a grid of thresholds fixed in advance (j / grid on a confidence in [0, 1]), with a
    Bonferroni correction: each null "the risk among images answered at lambda_j exceeds alpha" is rejected
    when P(Bin(n_answered, alpha) <= errors) <= delta / grid; the lowest rejected lambda is chosen.
    """
    confidence, labels, decisions = _check(confidence, labels, decisions, alpha, risk)
    if not 0 < delta < 1:
        raise ConformalError(f"delta={delta} must be in (0, 1)")
    if confidence.min() < 0 or confidence.max() > 1:
        raise ConformalError("the high-probability version needs confidences in [0, 1]")
    n = len(confidence)
    loss = _losses(risk, labels != decisions, labels, decisions)
    counted = np.ones(n, dtype=bool) if risk == "error" else labels == 1
    chosen: tuple[float, int, int, int] | None = None
    for j in range(grid):
        lam = j / grid
        answered = confidence >= lam
        k, m = int(loss[answered].sum()), int((answered & counted).sum())
        if m and binomial_cdf(k, m, alpha) <= delta / grid:
            chosen = (lam, int(answered.sum()), k, m)
            break  # the lowest rejected lambda answers the most
    if chosen is None:
        needed = math.ceil(math.log(delta / grid) / math.log1p(-alpha))
        raise ConformalError(
            f"no confidence threshold keeps the {risk} risk among answered images below alpha={alpha} with "
            f"probability 1-delta={1 - delta:g} (n={n}); even error-free answers need {needed} of them"
        )
    lam, n_answered, k, m = chosen
    return Selection(lam, n_answered / n, k / m, n)


def _check(confidence, labels, decisions, alpha, risk):
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    decisions = np.asarray(decisions).reshape(-1).astype(np.int64)
    if not (len(confidence) == len(labels) == len(decisions)) or len(confidence) == 0:
        raise ConformalError("confidence, labels and decisions must be equal, non-empty arrays")
    if not np.isfinite(confidence).all():
        raise ConformalError("confidence holds NaN or infinite values")
    if not 0 < alpha < 1:
        raise ConformalError(f"alpha={alpha} must be in (0, 1)")
    if risk not in RISKS:
        raise ConformalError(f"risk {risk!r}: one of {', '.join(RISKS)}")
    return confidence, labels, decisions


def fit_temperature(logits, labels) -> float:
    """The temperature T > 0 minimising the NLL of sigmoid(logit / T) (golden-section search on log T)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0, s) - y * s))

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)
