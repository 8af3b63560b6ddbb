"""Selective conformal risk control (streetvision.eval.conformal): the finite-sample guarantees, simulated
on a known score distribution, and the one-line refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss

from streetvision.eval import conformal
from streetvision.eval.metrics import calibration_errors

DRAWS = 300


def draw(rng, n, sep=1.5):
    """A known world: labels 50/50, logits sep*(2y-1) + N(0, 1.5); decide p >= 0.5; confidence |2p-1|."""
    y = rng.integers(0, 2, n)
    z = sep * (2 * y - 1) + rng.normal(0, 1.5, n)
    p = 1 / (1 + np.exp(-z))
    return np.abs(2 * p - 1), y, (p >= 0.5).astype(int)


def simulate(alpha, risk, delta=None, n=500, m=4000, seed=0, sep=1.5):
    """Realised risk on fresh test draws of the selection fitted on each of DRAWS calibration draws."""
    rng = np.random.default_rng(seed)
    realised, violations = [], 0
    for _ in range(DRAWS):
        c, y, d = draw(rng, n, sep)
        sel = (
            conformal.crc(c, y, d, alpha=alpha, risk=risk)
            if delta is None
            else conformal.ltt(c, y, d, alpha=alpha, delta=delta, risk=risk)
        )
        ct, yt, dt = draw(rng, m, sep)
        answered = ct >= sel.lam
        wrong = (yt != dt) if risk == "error" else ((yt == 1) & (dt == 0))
        if delta is None:  # the CRC loss on each test image, averaged
            realised.append(float(np.mean(answered & wrong)))
        else:  # the risk among answered test images (roadwork ones for fnr)
            base = answered if risk == "error" else answered & (yt == 1)
            r = float(wrong[base].mean()) if base.any() else 0.0
            realised.append(r)
            violations += r > alpha
    return np.array(realised), violations / DRAWS


@pytest.mark.parametrize("risk", ["error", "fnr"])
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_crc_keeps_the_expected_risk_at_alpha(alpha, risk):
    realised, _ = simulate(alpha, risk)
    se = realised.std(ddof=1) / math.sqrt(DRAWS)
    print(
        f"CRC {risk} alpha={alpha}: mean realised risk {realised.mean():.4f} (+- {se:.4f}) over {DRAWS} draws"
    )
    assert realised.mean() <= alpha + 3 * se
    assert realised.mean() >= 0.5 * alpha  # not vacuous: the guarantee is used, not met by answering nothing


@pytest.mark.parametrize("risk", ["error", "fnr"])
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_ltt_keeps_the_risk_among_answered_below_alpha_with_probability_one_minus_delta(alpha, risk):
    delta = 0.1
    realised, violated = simulate(alpha, risk, delta=delta, n=2000, seed=1, sep=2.5)
    mc = 3 * math.sqrt(delta * (1 - delta) / DRAWS)
    print(
        f"LTT {risk} alpha={alpha} delta={delta}: violation frequency {violated:.3f}, mean risk {realised.mean():.4f}"
    )
    assert violated <= delta + mc


def test_crc_without_selection_is_the_conformal_quantile_by_hand():
    c = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    y = np.array([1, 1, 1, 0, 1, 1, 0, 1, 1])
    d = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0])  # errors at confidence 0.6, 0.3, 0.2, 0.1
    # (sum loss + 1)/(n + 1) <= alpha: with n = 9, alpha = 0.2 allows one error (2/10): answer down to 0.4.
    sel = conformal.crc(c, y, d, alpha=0.2)
    assert sel.lam == 0.4 and sel.coverage == pytest.approx(6 / 9) and sel.risk == pytest.approx(1 / 9)


def test_impossible_alpha_says_what_the_data_supports():
    c, y, d = draw(np.random.default_rng(0), 50)
    with pytest.raises(conformal.ConformalError, match="needs at least 99 calibration images"):
        conformal.crc(c, y, d, alpha=0.01)
    bad = np.ones(50, int)
    with pytest.raises(conformal.ConformalError, match="the data supports alpha >="):
        conformal.crc(c, 1 - bad, bad, alpha=0.03)  # every decision wrong
    with pytest.raises(conformal.ConformalError, match="need 104 of them"):
        conformal.ltt(c, y, d, alpha=0.05, delta=0.1)


def test_binomial_cdf_matches_the_textbook_values():
    from math import comb

    for n, k, p in [(10, 3, 0.2), (50, 0, 0.05), (200, 12, 0.05), (7, 7, 0.5)]:
        exact = sum(comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k + 1))
        assert conformal.binomial_cdf(k, n, p) == pytest.approx(exact, rel=1e-9)


def test_temperature_scaling_finds_the_generating_temperature_and_calibrates():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(int)
    t = conformal.fit_temperature(3 * z, y)  # logits three times too confident
    assert t == pytest.approx(3, rel=0.05)
    before = calibration_errors(1 / (1 + np.exp(-3 * z)), y)
    after = calibration_errors(1 / (1 + np.exp(-3 * z / t)), y)
    assert after["ece"] < before["ece"] / 3 and after["nll"] < before["nll"]
    assert after["nll"] == pytest.approx(log_loss(y, 1 / (1 + np.exp(-3 * z / t))), rel=1e-6)
