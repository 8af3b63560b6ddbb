"""train_baseline's network run again on a split's images, checked against what train_baseline stored.

train_gate needs each image's backbone features, which train_baseline does not keep. It loads train_baseline's verified
weights and computes features and the head's logit on the device (train_baseline's feature-cache path,
``models.data.infer``), and for every split train_baseline scored it checks that the logits are the ones train_baseline
wrote, image for image and challenge view for view: the proof that the dataset, the splits and the views
are the ones train_baseline saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streetvision.data.dataset import DataError
from streetvision.eval.sweep import margins
from streetvision.models.data import infer


@dataclass
class Rows:
    """What the backbone and head give for a split's rows (images or challenge views)."""

    features: np.ndarray
    logits: np.ndarray  # (rows,) roadwork logit
    labels: np.ndarray


def full_precision(precision: str) -> bool:
    return precision.startswith(("32", "64"))


class Rescorer:
    """Features and logits of a train_baseline network on a ``RoadworkData``'s splits, on ``device``."""

    def __init__(self, net, data, baseline: Path, *, device, precision: str, baseline_precision: str,
                 batch_size: int, num_workers: int, where: str):  # fmt: skip
        self.net, self.data, self.baseline, self.where = net, data, baseline, where
        self.device, self.precision = device, precision
        self.batch_size, self.num_workers = batch_size, num_workers
        # Under 16-bit autocast (either run's) logits agree to bf16's precision only.
        self.tolerance = 1e-3 if full_precision(precision) and full_precision(baseline_precision) else 0.1

    def rows(self, images) -> Rows:
        def features_and_logit(x):
            f = self.net.backbone(x)
            return torch.cat([f, self.net.head(f)], dim=1)

        out, labels, _ = infer(features_and_logit, images, batch_size=self.batch_size,
                               num_workers=self.num_workers, device=self.device, precision=self.precision)  # fmt: skip
        return Rows(out[:, :-1], out[:, -1], labels.astype(np.int64))

    def split(self, split: str) -> Rows:
        """A split's clean images, their logits checked against ``logits_<split>.npy``."""
        rows = self.rows(self.data.images(split))
        self._same(f"logits_{split}.npy", rows.logits)
        return rows

    def views(self, split: str, views: int) -> Rows:
        """train_baseline's challenge views of a split (the same seeded views), checked like :meth:`split`."""
        challenge = self.data.challenge_views(split, views)
        stored = np.load(self.baseline / f"views_{split}_challenge.npy", allow_pickle=False)
        if not np.array_equal(stored, challenge.rows()):
            raise DataError(f"--baseline {self.where}: views_{split}_challenge.npy are not its own views")
        rows = self.rows(challenge)
        self._same(f"logits_{split}_challenge.npy", rows.logits)
        return rows

    def _same(self, name: str, ours: np.ndarray) -> None:
        theirs = margins(np.load(self.baseline / name, allow_pickle=False))
        if ours.shape != theirs.shape:
            raise DataError(
                f"--baseline {self.where}: {name} has {len(theirs)} rows, these images give {len(ours)}"
            )
        gap = float(np.max(np.abs(ours - theirs) / (1 + np.abs(theirs)))) if len(ours) else 0.0
        if gap > self.tolerance:
            raise DataError(
                f"--baseline {self.where}: {name} differs from what its weights compute on --shards (relative "
                f"gap {gap:.3g} > {self.tolerance}); the packed splits are not the ones train_baseline scored"
            )
