"""The data side of train_baseline as Lightning expects it: a ``LightningDataModule`` and the feature cache.

:class:`RoadworkData` owns the packed splits, the timm transforms and the choice between images and cached
backbone features. :class:`FeatureCache` fills that cache when fitting is set up, on the trainer's
device: with a frozen backbone and no augmentation, the backbone's output for an image never
changes, so it is computed once (each rank its share, gathered) and the head trains on it.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from litdata import StreamingDataLoader
from torch.utils.data import ChainDataset, DataLoader, Dataset

from streetvision.data import challenge
from streetvision.errors import StreetVisionError
from streetvision.models.data import (
    ChallengeAugment,
    ExtraImages,
    StreamedViews,
    as_features,
    infer,
    loader,
    own_generator,
)
from streetvision.models.network import create_transform

CACHED = ("train", "val_select")


def check_whole_batches(samples: int, world: int, batch_size: int, split: str = "train") -> None:
    """Under DDP litdata gives every rank the same number of whole batches of the streamed split
    (``drop_last``): a split that leaves a rank less than one batch trained nothing at all, silently
    (Lightning ran epochs of no step, and train_baseline then had no best epoch to keep)."""
    if world > 1 and samples // world < batch_size:
        raise StreetVisionError(
            f"data.batch_size={batch_size}: the {split} split's {samples} samples give each of the {world} ranks "
            f"{samples // world}, less than one batch (under DDP every rank takes whole batches only); lower "
            "data.batch_size or run fewer ranks"
        )


class EpochLoader(StreamingDataLoader):
    """litdata's loader (its state goes into every checkpoint, so a run killed mid-epoch continues the
    epoch exactly) numbering its epochs by ``counter``, which the DataModule saves in every checkpoint:
    litdata counts its own iterations, and Lightning restores a loader's state only from a checkpoint
    taken mid-epoch, so a run resumed after a whole epoch would otherwise replay the first epoch's order."""

    def __init__(self, dataset, counter: dict, **kwargs):
        super().__init__(dataset, **kwargs)
        self.counter = counter
        self._resuming = False

    def load_state_dict(self, obj: dict) -> None:
        saved, dataset = obj.get("dataset"), self.dataset
        if (
            isinstance(saved, dict)
            and dataset.input_dir.url
            and saved.get("input_dir_url") == dataset.input_dir.url
        ):
            # Streamed from the object store, litdata's saved position names the local cache folder it
            # read through, a temporary one of the killed process: litdata refused every resume of an
            # s3:// pack. The source (the URL, still checked by litdata) is what must match.
            obj = {**obj, "dataset": {**saved, "input_dir_path": dataset.input_dir.path,
                                      "cache_dir_path": dataset.cache_dir.path}}  # fmt: skip
        super().load_state_dict(obj)
        self._resuming = True  # the next epoch continues the saved one; those after it start afresh

    def __iter__(self):
        return self._epoch()

    def _epoch(self):
        # A generator: this runs at the first batch, after Lightning may have loaded a saved position
        # (it creates the iterator before it restores a checkpoint).
        # litdata clears ``restore`` only when an epoch is read to its very end, which Lightning, stopping
        # at the epoch's batch count, does not always do: the epoch after a resumed one came out empty.
        if self.restore and not self._resuming:
            self.restore = False
        self._resuming = False
        if not self.restore:
            self.current_epoch = self.counter["epochs"]  # litdata adds one as the epoch starts
        self.counter["epochs"] = self.current_epoch + (0 if self.restore else 1)
        yield from super().__iter__()


class _Epochs:
    """A DataModule's count of training epochs started, saved with every checkpoint."""

    def state_dict(self) -> dict:
        return {"epochs": self.epochs["epochs"]}

    def load_state_dict(self, state: dict) -> None:
        self.epochs["epochs"] = int(state["epochs"])


class RoadworkData(_Epochs, L.LightningDataModule):
    """train and val_select for fitting (streamed images, or cached features), and any split streamed.

    Every split is streamed from a verified pack (:mod:`streetvision.data.packed`) through a local cache of
    ``cache_bytes`` at most: half for the training split, half for the one being evaluated (removed once
    read). Streams are built in the hooks, where the process group exists: litdata records the rank when
    a stream is built.
    """

    def __init__(
        self,
        pack,
        prep: dict,
        decode_side: int,
        *,
        batch_size: int,
        num_workers: int,
        augment: str,
        cache: bool,
        seed: int,
        cache_dir: Path,
        cache_bytes: int,
    ):
        super().__init__()
        self.pack, self.prep, self.side = pack, prep, decode_side
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.augment, self.cache = augment, cache
        self.cache_dir, self.cache_bytes = Path(cache_dir), cache_bytes
        self.features: dict[str, Dataset] = {}
        self._streams = 0
        self.epochs = {"epochs": 0}

    def labels(self, split: str) -> np.ndarray:
        return np.asarray(self.pack.labels(split), dtype=np.int64)

    def _stream(self, split: str, transform, side: int, *, shuffle: bool = False):
        """Training (``shuffle``): litdata divides the split among the ranks, equal counts (``drop_last``,
        its default under DDP: up to a batch per rank of each epoch's order is left out, a different one
        every epoch). Evaluation: every rank streams the split and scores its every world-th image."""
        from streetvision.data import packed

        self._streams += 1
        return packed.streamed(
            self.pack, split, packed.Decode(transform, side),
            cache_dir=self.cache_dir / f"{split}-{self._streams}", cache_bytes=self.cache_bytes // 2,
            shuffle=shuffle, seed=self.seed, whole=not shuffle,
        )  # fmt: skip

    def images(self, split: str, *, augment: str = "none", shuffle: bool = False):
        """A split's images streamed with the eval transform, or with training augmentation (``timm``:
        timm's own; ``challenge``: the validator's challenge views, :class:`ChallengeAugment`)."""
        if augment == "challenge":
            transform, side = ChallengeAugment(create_transform(self.prep)), challenge.DECODE_SIDE
        else:
            transform, side = create_transform(self.prep, training=augment == "timm"), self.side
        return self._stream(split, transform, side, shuffle=shuffle)

    def challenge_views(self, split: str, views: int, seed: int | None = None) -> StreamedViews:
        """``views`` validator-style views of every image of a split, seeded by (``seed``, image, view)."""
        stream = self._stream(split, _as_is, challenge.DECODE_SIDE)
        seed = self.seed if seed is None else seed
        return StreamedViews(stream, len(self.pack.ids(split)), views, seed, create_transform(self.prep))

    def train_dataloader(self) -> DataLoader:
        if self.cache:  # cached features are in memory already
            return loader(self.features["train"], self.batch_size, shuffle=True, seed=self.seed)
        # The order is a function of (seed, epoch); the loader's state is saved in every checkpoint, so a
        # resumed training continues the epoch where it stopped.
        stream = self.images("train", augment=self.augment, shuffle=True)
        return EpochLoader(stream, self.epochs, batch_size=self.batch_size, num_workers=self.num_workers,
                           generator=own_generator(self.seed))  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        if self.cache:
            return loader(self.features["val_select"], self.batch_size)
        return loader(self.images("val_select"), self.batch_size, num_workers=self.num_workers)


class UnlabelledData(_Epochs, L.LightningDataModule):
    """adapt_explora's images: the pack's train split streamed (and shuffled by seed and epoch), then any
    extra image files, each as ``transform``'s crops; the stream is built in the hook (the rank is known)."""

    def __init__(self, pack, extra_files, transform, side: int, *, batch_size: int, num_workers: int, seed: int,
                 cache_dir: Path, cache_bytes: int):  # fmt: skip
        super().__init__()
        self.pack, self.extra_files, self.transform, self.side = pack, list(extra_files), transform, side
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.cache_dir, self.cache_bytes = Path(cache_dir), cache_bytes
        self.epochs = {"epochs": 0}

    def _stream(self, transform, *, shuffle: bool, name: str):
        from streetvision.data import packed

        return packed.streamed(self.pack, "train", packed.Decode(transform, self.side, labelled=False),
                               cache_dir=self.cache_dir / name, cache_bytes=self.cache_bytes, shuffle=shuffle,
                               seed=self.seed, drop_last=None if shuffle else False)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        stream = self._stream(self.transform, shuffle=True, name="train")
        if not self.extra_files:
            return EpochLoader(stream, self.epochs, batch_size=self.batch_size, num_workers=self.num_workers,
                               generator=own_generator(self.seed))  # fmt: skip
        extra = ExtraImages(self.extra_files, self.transform, self.side, self.seed)
        world = self.trainer.world_size if self.trainer is not None else 1
        both = _Chained([stream, extra], len(stream) + -(-len(self.extra_files) // world))
        return DataLoader(both, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=own_generator(self.seed))  # fmt: skip

    def first(self, n: int, prep: dict) -> list:
        """The first ``n`` train images (packed order) as the backbone's eval transform gives them."""
        from streetvision.models.data import release

        stream = self._stream(create_transform(prep), shuffle=False, name="first")
        images = [image for _, image in zip(range(n), stream, strict=False)]
        release(stream)
        return images


class _Chained(ChainDataset):
    """Streams one after the other, with the length the schedule counts batches by (this rank's share)."""

    def __init__(self, datasets, length: int):
        super().__init__(datasets)
        self.length = length

    def __len__(self) -> int:
        return self.length


def _as_is(image):
    return image


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
