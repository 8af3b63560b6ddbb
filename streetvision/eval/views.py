"""train_baseline's scores on a split, as the images were (``clean``) or as the validator sends them (``challenge``).

``challenge``: ``eval.challenge_views`` validator-style views of every image (``data.challenge``), their
logits in ``logits_<split>_challenge.npy`` and, per row, the image's row in the split and the view's level
in ``views_<split>_challenge.npy``. Numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streetvision.errors import StreetVisionError
from streetvision.eval.sweep import check_labels, margins, sigmoid

VIEWS = ("clean", "challenge")
LEVELS = 4


class ViewError(StreetVisionError):
    """A train_baseline output lacks a view's scores, or they do not fit together."""


@dataclass(frozen=True)
class Scores:
    scores: np.ndarray  # P(roadwork) per row
    labels: np.ndarray  # 0/1 per row
    levels: np.ndarray | None  # challenge level per row (None for clean)
    images: int  # distinct images the rows come from
    logits: np.ndarray  # the roadwork logit per row (sigmoid of it is the score)
    rows: np.ndarray  # the image (row of the split) each row is a view of

    def by_level(self) -> dict[int, np.ndarray]:
        """Row masks per challenge level present."""
        if self.levels is None:
            return {}
        return {int(v): self.levels == v for v in np.unique(self.levels)}


def gate_file(split: str, view: str) -> str:
    """Where train_gate writes its scores of a split's rows in ``view`` (aligned with train_baseline's rows)."""
    return f"gate_{split}{'_challenge' if view == 'challenge' else ''}.npy"


def load_gate(root: Path, split: str, view: str, rows: int) -> np.ndarray:
    """train_gate's scores of ``split`` in ``view`` from a verified folder holding them (train_gate's output,
    or a gate policy's): one probability per row of train_baseline's scores, ``rows`` of them."""
    name = gate_file(split, view)
    scores = _npy(Path(root) / name).astype(np.float64).reshape(-1)
    if scores.shape != (rows,) or not (np.isfinite(scores).all() and 0 <= scores.min() <= scores.max() <= 1):
        raise ViewError(f"{root}: {name} must hold one probability per {view} row of {split} ({rows})")
    return scores


def _npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ViewError(f"{path}: cannot be read as a .npy array ({e})") from None


def load(baseline: Path, split: str, view: str) -> Scores:
    """The scores and labels of ``split`` in ``view`` from a verified train_baseline directory."""
    if view not in VIEWS:
        raise ViewError(f"view {view!r}: one of {', '.join(VIEWS)}")
    logits = margins(_npy(baseline / f"logits_{split}.npy"))
    labels = check_labels(logits, _npy(baseline / f"labels_{split}.npy"))
    if view == "clean":
        return Scores(sigmoid(logits), labels, None, len(labels), logits, np.arange(len(labels)))
    logits_file = baseline / f"logits_{split}_challenge.npy"
    if not logits_file.is_file():
        raise ViewError(
            f"{baseline}: no challenge views of {split} (train_baseline ran with eval.challenge_views=0); "
            "re-run train_baseline with eval.challenge_views=4, or use sweep.views=clean"
        )
    views = _npy(baseline / f"views_{split}_challenge.npy")
    challenged = margins(_npy(logits_file))
    if views.ndim != 2 or views.shape != (len(challenged), 2) or views.dtype.kind not in "iu":
        raise ViewError(
            f"{baseline}: views_{split}_challenge.npy must be (rows, 2) integers matching its logits"
        )
    rows, levels = views[:, 0], views[:, 1]
    if (
        len(rows) == 0
        or rows.min() < 0
        or rows.max() >= len(labels)
        or levels.min() < 0
        or levels.max() >= LEVELS
    ):
        raise ViewError(f"{baseline}: views_{split}_challenge.npy names rows or levels out of range")
    return Scores(
        sigmoid(challenged), labels[rows], levels.astype(np.int64), len(np.unique(rows)), challenged, rows
    )
