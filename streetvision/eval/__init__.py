"""Evaluation: the one place metrics are computed."""

from streetvision.eval.metrics import compute_all_metrics, compute_mcc, confusion_counts, metrics_from_counts

__all__ = ["compute_all_metrics", "compute_mcc", "confusion_counts", "metrics_from_counts"]
