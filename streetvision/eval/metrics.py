"""Binary classification metrics, computed here and nowhere else.

Counts come from one vectorised pass (``bincount`` of ``2*y_true + y_pred``); every rate is derived from the
four counts, so the same formulas serve a single prediction vector and a whole threshold sweep (arrays of
counts). Degenerate cases follow scikit-learn with ``zero_division=0``:

- MCC is 0.0 when any marginal is empty (one class only in truth or prediction), as
  ``sklearn.metrics.matthews_corrcoef`` returns.
- precision, recall, F1, FNR and FPR are 0.0 when their denominator is 0.
- on empty input accuracy is 0.0 and every count is 0 (scikit-learn raises or returns nan there; a number
  keeps JSON reports valid).
"""

from __future__ import annotations

from typing import Any

import numpy as np

RATE_NAMES = ("mcc", "accuracy", "precision", "recall", "f1", "fnr", "fpr")  # the keys of metrics_from_counts
METRIC_NAMES = (*RATE_NAMES, "tp", "tn", "fp", "fn")


def _as_binary(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, without importing torch
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim == 2 and 1 in arr.shape:  # a column or row vector
        arr = arr.reshape(-1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1")
    return arr.astype(np.int64, copy=False)


def confusion_counts(y_true: Any, y_pred: Any) -> tuple[int, int, int, int]:
    """(tp, tn, fp, fn) for binary labels, in one pass."""
    t = _as_binary(y_true, "y_true")
    p = _as_binary(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    tn, fp, fn, tp = np.bincount(2 * t + p, minlength=4)[:4]
    return int(tp), int(tn), int(fp), int(fn)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def mcc_from_counts(tp, tn, fp, fn) -> np.ndarray:
    """MCC from counts (scalars or arrays); float64 throughout so 10^7-sized products do not overflow."""
    tp, tn, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, tn, fp, fn))
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return _ratio(tp * tn - fp * fn, den)


def metrics_from_counts(tp, tn, fp, fn) -> dict[str, np.ndarray]:
    """Every metric from counts; arrays in, arrays out (used by the threshold sweep)."""
    tp, tn, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, tn, fp, fn))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "mcc": mcc_from_counts(tp, tn, fp, fn),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "fnr": _ratio(fn, tp + fn),
        "fpr": _ratio(fp, fp + tn),
    }


def compute_all_metrics(y_true: Any, y_pred: Any) -> dict[str, float | int]:
    """mcc, accuracy, precision, recall, f1, fnr, fpr, tp, tn, fp, fn for binary labels.

    Accepts lists, numpy arrays or torch tensors of 0/1 (or bool).
    """
    tp, tn, fp, fn = confusion_counts(y_true, y_pred)
    rates = {k: float(v) for k, v in metrics_from_counts(tp, tn, fp, fn).items()}
    return {**rates, "tp": tp, "tn": tn, "fp": fp, "fn": fn}


def compute_mcc(y_true: Any, y_pred: Any) -> float:
    return float(mcc_from_counts(*confusion_counts(y_true, y_pred)))


# The StreetVision subnet validator's reward (natixnetwork/streetvision-subnet: natix/validator/reward.py,
# miner_performance_tracker.py, config.py): per challenge, (0.5 * max(0, MCC over the miner's last 100
# answers) + 0.5 * accuracy over its last 10) ** 3, each answer cut with np.round (0.5 counts as 0).
REWARD_MCC_WINDOW = 100
REWARD_ACCURACY_WINDOW = 10
REWARD_EXPONENT = 3.0


def _rolling(x: np.ndarray, window: int) -> np.ndarray:
    """Sums over the last ``window`` columns ending at each column from ``window - 1`` on."""
    c = np.cumsum(x, axis=1, dtype=np.int64)
    c = np.concatenate([np.zeros((x.shape[0], 1), np.int64), c], axis=1)
    return c[:, window:] - c[:, :-window]


def subnet_reward(
    labels: Any,
    served: Any,
    *,
    seed: int = 0,
    steps: int = 2000,
    repeats: int = 20,
) -> dict[str, float | int]:
    """The validator's expected reward per challenge for a miner that answers ``served[i]`` to item ``i``.

    Simulated: ``repeats`` streams of ``steps`` challenges, each drawing the label 50/50 (as the validator
    does) and then one of the items with that label uniformly; rewards are averaged from the first
    challenge with a full 100-answer window on (the validator's EMA smooths rewards, it does not change
    their mean). Returns the mean reward and the mean windowed MCC and accuracy.
    """
    y = _as_binary(labels, "labels")
    p = np.asarray(served, dtype=np.float64).reshape(-1)
    if p.shape != y.shape or y.size == 0:
        raise ValueError(f"labels and served probabilities must be equal, non-empty ({y.size} vs {p.size})")
    if steps < REWARD_MCC_WINDOW:
        raise ValueError(f"steps must be at least {REWARD_MCC_WINDOW}")
    decided = (np.round(p) == 1).astype(np.int64)  # what the validator does with the float
    rng = np.random.default_rng(seed)
    by_label = [np.flatnonzero(y == c) for c in (0, 1)]
    truth = rng.integers(0, 2, (repeats, steps))
    pick = np.empty_like(truth)
    for c in (0, 1):
        if by_label[c].size == 0:
            raise ValueError(f"no item with label {c}: the validator asks about both classes")
        mask = truth == c
        pick[mask] = by_label[c][rng.integers(0, by_label[c].size, mask.sum())]
    answer = decided[pick]
    counts = [
        _rolling((truth == t) & (answer == a), REWARD_MCC_WINDOW) for t, a in ((1, 1), (0, 0), (0, 1), (1, 0))
    ]
    mcc = np.maximum(0.0, mcc_from_counts(*counts))
    correct = (truth == answer).astype(np.int64)
    accuracy = _rolling(correct, REWARD_ACCURACY_WINDOW)[:, REWARD_MCC_WINDOW - REWARD_ACCURACY_WINDOW :]
    accuracy = accuracy / REWARD_ACCURACY_WINDOW
    reward = (0.5 * mcc + 0.5 * accuracy) ** REWARD_EXPONENT
    return {
        "reward": float(reward.mean()),
        "mcc_100": float(mcc.mean()),
        "accuracy_10": float(accuracy.mean()),
        "steps": steps,
        "repeats": repeats,
    }


def calibration_errors(probs: Any, labels: Any, bins: int = 15) -> dict[str, float]:
    """How well P(roadwork) matches frequencies: ECE and MCE over ``bins`` equal-width bins of the
    top-label confidence max(p, 1 - p) against the accuracy of deciding p >= 0.5, the NLL and the Brier
    score."""
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), 1e-12, 1 - 1e-12)
    y = _as_binary(labels, "labels")
    if p.shape != y.shape or y.size == 0:
        raise ValueError("probabilities and labels must be equal, non-empty")
    confidence = np.maximum(p, 1 - p)
    correct = (p >= 0.5).astype(np.int64) == y
    which = np.minimum((confidence - 0.5) * 2 * bins, bins - 1).astype(np.int64)
    gaps = []
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            gaps.append((in_bin.mean(), abs(confidence[in_bin].mean() - correct[in_bin].mean())))
    return {
        "ece": float(sum(w * g for w, g in gaps)),
        "mce": float(max(g for _, g in gaps)),
        "nll": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
        "brier": float(np.mean((p - y) ** 2)),
    }


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` (1 positive): the probability that a random
    positive scores above a random negative, ties counting one half (Mann-Whitney U from midranks), as
    ``sklearn.metrics.roc_auc_score``. 0.5 when only one class is present (scikit-learn raises there)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = _as_binary(labels, "labels")
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length ({s.size} vs {y.size})")
    pos, neg = int(y.sum()), int(y.size - y.sum())
    if pos == 0 or neg == 0:
        return 0.5
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    first = np.r_[True, sorted_s[1:] != sorted_s[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], s.size]
    midrank = (starts + ends + 1) / 2.0  # 1-based midrank of each run of ties
    ranks = np.empty(s.size)
    ranks[order] = midrank[group]
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))
