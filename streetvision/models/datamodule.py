"""The data side of train_baseline as Lightning expects it: a ``LightningDataModule`` and the feature cache.

:class:`RoadworkData` owns the splits, the timm transforms and the choice between images and cached
backbone features. :class:`FeatureCache` fills that cache when fitting is set up, on the trainer's
device: with a frozen backbone and no augmentation, the backbone's output for an image never
changes, so it is computed once (each rank its share, gathered) and the head trains on it.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from streetvision.data import challenge
from streetvision.models.data import (
    ChallengeAugment,
    ChallengeViews,
    ImageDataset,
    as_features,
    infer,
    loader,
)
from streetvision.models.network import create_transform

CACHED = ("train", "val_select")


class RoadworkData(L.LightningDataModule):
    """train and val_select for fitting (images, or cached features), and any split's images."""

    def __init__(
        self,
        root: Path,
        parts: dict[str, list[str]],
        label_of: dict[str, int],
        prep: dict,
        decode_side: int,
        *,
        batch_size: int,
        num_workers: int,
        augment: str,
        cache: bool,
        seed: int,
    ):
        super().__init__()
        self.root, self.parts, self.label_of, self.prep, self.side = root, parts, label_of, prep, decode_side
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.augment, self.cache = augment, cache
        self.features: dict[str, Dataset] = {}

    def images(self, split: str, *, augment: str = "none") -> ImageDataset:
        """A split's images with the eval transform, or with training augmentation (``timm``: timm's
        own; ``challenge``: the validator's challenge views, :class:`ChallengeAugment`)."""
        ids = self.parts[split]
        labels = np.array([self.label_of[i] for i in ids])
        if augment == "challenge":
            transform, side = ChallengeAugment(create_transform(self.prep)), challenge.DECODE_SIDE
        else:
            transform, side = create_transform(self.prep, training=augment == "timm"), self.side
        return ImageDataset(self.root, ids, labels, transform, side)

    def challenge_views(self, split: str, views: int) -> ChallengeViews:
        return ChallengeViews(self.images(split), views, self.seed)

    def fit_data(self, split: str) -> Dataset:
        """What the loop sees for train / val_select: cached features, or images (augmented for train)."""
        if self.cache:
            return self.features[split]
        return self.images(split, augment=self.augment if split == "train" else "none")

    def train_dataloader(self) -> DataLoader:
        workers = 0 if self.cache else self.num_workers  # cached features are in memory already
        return loader(
            self.fit_data("train"), self.batch_size, shuffle=True, num_workers=workers, seed=self.seed
        )

    def val_dataloader(self) -> DataLoader:
        workers = 0 if self.cache else self.num_workers
        return loader(self.fit_data("val_select"), self.batch_size, num_workers=workers)


class FeatureCache(L.Callback):
    """Compute the frozen backbone's features for train and val_select on the trainer's device."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the optimizers are configured (their schedule counts the cached training batches), after
        # the distributed environment is up, on the device the trainer will train on.
        data: RoadworkData = trainer.datamodule
        if stage != "fit" or not data.cache or data.features:
            return
        device = trainer.strategy.root_device
        backbone = pl_module.net.backbone.to(device)
        mode = backbone.training
        backbone.eval()
        for split in CACHED:
            outputs = infer(
                backbone,
                data.images(split),
                batch_size=data.batch_size,
                num_workers=data.num_workers,
                device=device,
                precision=str(trainer.precision),
                strategy=trainer.strategy,
            )
            data.features[split] = as_features(outputs)
        backbone.train(mode)
