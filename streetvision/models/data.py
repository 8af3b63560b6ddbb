"""Image data for training and inference: a dataset of (image, label, index), and cached backbone features."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset, TensorDataset

from streetvision.data import challenge
from streetvision.data.images import load_rgb


class ImageDataset(Dataset):
    """Images by id under ``root``, decoded at reduced size, then the timm transform."""

    def __init__(
        self, root: Path, ids: Sequence[str], labels: np.ndarray, transform: Callable, min_side: int
    ):
        self.root, self.ids, self.labels = Path(root), list(ids), np.asarray(labels, dtype=np.float32)
        self.transform, self.min_side = transform, min_side

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        image = load_rgb(self.root / self.ids[i], self.min_side)
        return self.transform(image), torch.tensor(self.labels[i]), i


def view_rows(images: int, views: int) -> np.ndarray:
    """(image index, level) of every challenge view of ``images`` images, ``views`` each."""
    k = np.arange(images * views)
    return np.stack([k // views, k % len(challenge.LEVEL_PROBS)], axis=1)


class ChallengeViews(Dataset):
    """``views`` validator-style challenge views of every image (:mod:`streetvision.data.challenge`), then
    the eval ``transform``; item ``k`` is view ``k % views`` of image ``k // views``.

    The levels are spread evenly (view ``k`` has level ``k % 4``), where the validator draws each with
    probability 1/4; every other parameter is drawn from a generator seeded by (seed, image, view), so
    the views are the same on every rank and every run.
    """

    def __init__(self, images: ImageDataset, views: int, seed: int):
        self.images, self.views, self.seed = images, views, seed

    def __len__(self) -> int:
        return len(self.images) * self.views

    def rows(self) -> np.ndarray:
        """(image index, level) of every item."""
        return view_rows(len(self.images), self.views)

    def __getitem__(self, k: int):
        (i, view), level = divmod(k, self.views), k % len(challenge.LEVEL_PROBS)
        image = load_rgb(self.images.root / self.images.ids[i], challenge.DECODE_SIDE)
        rng = np.random.default_rng([self.seed, i, view])
        sent, _ = challenge.challenge(image, rng, level)
        return self.images.transform(sent), torch.tensor(self.images.labels[i]), k


class Share(IterableDataset):
    """One rank's share of a split streamed whole: the samples whose index is ``rank`` modulo ``world``
    (the others are read but not decoded). Shares differ by one sample at most and are never empty while
    the split has ``world`` samples, so evaluation needs no litdata chunk balance and no rank waits on
    another's empty loader."""

    def __init__(self, dataset, rank: int, world: int, total: int):
        self.dataset, self.rank, self.world = dataset, rank, world
        self.cache_dir_sv, self.total_sv = dataset.cache_dir_sv, total

    # No __len__: with loader workers each worker ends on a partial batch of its own, so a loop that stops
    # after len // batch batches (Lightning's, when it can take a length) would leave images unscored.

    def __iter__(self):
        return (item for item in self.dataset if item is not None)


class StreamedViews(IterableDataset):
    """:class:`ChallengeViews` of a streamed split: ``stream`` yields (image, label, index) with the image
    decoded at ``challenge.DECODE_SIDE`` and untransformed; item ``k`` is view ``k % views`` of image
    ``k // views``, drawn exactly as :class:`ChallengeViews` draws it. ``images``: the split's size."""

    def __init__(self, stream, images: int, views: int, seed: int, transform: Callable):
        self.stream, self.images, self.views, self.seed, self.transform = (
            stream,
            images,
            views,
            seed,
            transform,
        )
        self.cache_dir_sv = getattr(stream, "cache_dir_sv", None)

    def __len__(self) -> int:
        return self.images * self.views

    def rows(self) -> np.ndarray:
        return view_rows(self.images, self.views)

    def __iter__(self):
        for image, label, i in self.stream:
            for view in range(self.views):
                k = i * self.views + view
                rng = np.random.default_rng([self.seed, i, view])
                sent, _ = challenge.challenge(image, rng, k % len(challenge.LEVEL_PROBS))
                yield self.transform(sent), label, k


class ChallengeAugment:
    """A training transform: a random challenge view (level drawn as the validator draws it), then
    ``transform``. Its generator is seeded from torch's, which Lightning seeds per run and per worker."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        return self.transform(challenge.challenge(image, rng)[0])


class EpochShuffle(Sampler[int]):
    """Every epoch a new order that depends on the seed and the epoch alone (Lightning calls
    ``set_epoch``), so a run resumed from a checkpoint sees the batches an uninterrupted run sees."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())


def own_generator(seed: int) -> torch.Generator:
    """Every loader gets its own generator: a loader without one draws its base seed from the global RNG,
    which would make the model's dropout masks depend on how many loaders were iterated before."""
    return torch.Generator().manual_seed(seed)


def loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    num_workers: int = 0,
    seed: int = 0,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffle(len(dataset), seed) if shuffle else None,
        num_workers=num_workers,
        generator=own_generator(seed),
        persistent_workers=num_workers > 0,
    )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast type the trainer's precision implies on ``device`` (None: full precision)."""
    if device.type != "cuda":
        return None
    return (
        torch.bfloat16
        if precision.startswith("bf16")
        else torch.float16
        if precision.startswith("16")
        else None
    )


@torch.no_grad()
def infer(
    fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device,
    precision: str = "32-true",
    num_workers: int = 0,
    strategy=None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(outputs, labels, indices) of ``fn`` over every item of ``dataset``, sorted by index, on every rank.

    Each of the strategy's ranks computes its share (every world_size-th item) on ``device``, under the
    trainer's autocast; the shares are gathered, so every item is computed exactly once.
    """
    rank, world = (strategy.global_rank, strategy.world_size) if strategy is not None else (0, 1)
    # A streamed split (a Share) is this rank's every world-th item already.
    share = (
        dataset if isinstance(dataset, IterableDataset) else Subset(dataset, range(rank, len(dataset), world))
    )
    dtype = autocast_dtype(precision, device)
    outs, labels, idx = [], [], []
    for x, y, i in loader(share, batch_size, num_workers=num_workers):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outs.append(fn(x.to(device)).float())
        labels.append(y.to(device))
        idx.append(i.to(device))
    release(dataset)
    out, lab, ix = torch.cat(outs), torch.cat(labels), torch.cat(idx)
    if world > 1:  # equal shapes for all_gather: pad every share to the longest, index -1 marks padding
        longest = int(strategy.all_gather(torch.tensor([len(ix)], device=device)).max())
        pad = longest - len(ix)
        out = torch.cat([out, out.new_zeros(pad, *out.shape[1:])])
        lab, ix = torch.cat([lab, lab.new_zeros(pad)]), torch.cat([ix, ix.new_full((pad,), -1)])
        out, lab, ix = (strategy.all_gather(t).flatten(0, 1) for t in (out, lab, ix))
        keep = ix >= 0
        out, lab, ix = out[keep], lab[keep], ix[keep]
    order, total = torch.argsort(ix), getattr(dataset, "total_sv", None) or len(dataset)
    if len(ix) != total or not torch.equal(ix[order].cpu(), torch.arange(total)):
        raise RuntimeError(f"scored {len(ix)} rows of {total}, not each once")
    return out[order].cpu().numpy(), lab[order].cpu().numpy(), ix[order].cpu().numpy()


def release(dataset) -> None:
    """Remove a streamed dataset's local cache once it has been read (the next split gets the space)."""
    import shutil

    if (cache := getattr(dataset, "cache_dir_sv", None)) is not None:
        shutil.rmtree(cache, ignore_errors=True)


def as_features(outputs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> TensorDataset:
    """``infer``'s backbone features as a dataset of (features, label, index) for head-only training."""
    feats, labels, idx = outputs
    return TensorDataset(torch.from_numpy(feats), torch.from_numpy(labels), torch.from_numpy(idx))


class MultiCrop:
    """DINO's multi-crop augmentation of one image: ``global_crops`` crops of ``global_size`` (40-100 %
    of the image) and ``local_crops`` of ``local_size`` (5-40 %), each flipped, colour-jittered, sometimes
    grey, blurred or (the second global crop) solarised, then normalised as the backbone expects."""

    def __init__(self, global_size: int, local_size: int, local_crops: int, mean, std, global_crops: int = 2):
        from torchvision import transforms as T

        bicubic = T.InterpolationMode.BICUBIC
        common = [T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                  T.RandomGrayscale(0.2)]  # fmt: skip
        finish = [T.ToTensor(), T.Normalize(mean, std)]

        def blur(p: float, side: int):
            return T.RandomApply([T.GaussianBlur(2 * (side // 20) + 1, sigma=(0.1, 2.0))], p=p)

        self.globals = [
            T.Compose(
                [
                    T.RandomResizedCrop(global_size, (0.4, 1.0), interpolation=bicubic),
                    *common,
                    blur(1.0 if i == 0 else 0.1, global_size),
                    *([T.RandomSolarize(128, p=0.2)] if i else []),
                    *finish,
                ]
            )  # fmt: skip
            for i in range(global_crops)
        ]
        self.local = T.Compose([T.RandomResizedCrop(local_size, (0.05, 0.4), interpolation=bicubic), *common,
                                blur(0.5, local_size), *finish])  # fmt: skip
        self.local_crops = local_crops

    def __call__(self, image) -> list[torch.Tensor]:
        return [t(image) for t in self.globals] + [self.local(image) for _ in range(self.local_crops)]


class ExtraImages(IterableDataset):
    """Image files as an iterable of their crops, for adapt_explora's extra images beside a streamed
    split: each rank and loader worker reads every n-th file of a per-epoch shuffle (seed, epoch)."""

    def __init__(self, files: Sequence[Path], transform: Callable, min_side: int, seed: int):
        self.files, self.transform, self.min_side, self.seed, self.epoch = (
            list(files),
            transform,
            min_side,
            seed,
            0,
        )

    def __iter__(self):
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.files))
        self.epoch += 1
        for k in order[rank * workers + worker :: world * workers]:
            yield self.transform(load_rgb(self.files[k], self.min_side))


class UnlabelledImages(Dataset):
    """Image files, each as the list of its crops (labels are never read)."""

    def __init__(self, files: Sequence[Path], transform: Callable, min_side: int):
        self.files, self.transform, self.min_side = list(files), transform, min_side

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.transform(load_rgb(self.files[i], self.min_side))
