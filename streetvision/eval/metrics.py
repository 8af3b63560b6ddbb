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
