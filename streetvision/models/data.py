"""Image data for training and inference: a dataset of (image, label, index), and cached backbone features."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

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


def loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool = False, num_workers: int = 0, seed: int = 0
) -> DataLoader:
    # Every loader gets its own generator: a loader without one draws its base seed from the global RNG,
    # which would make the model's dropout masks depend on how many loaders were iterated before.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        persistent_workers=num_workers > 0,
    )


@torch.no_grad()
def predict(module: torch.nn.Module, data: DataLoader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(outputs, labels, indices) of ``module`` in eval mode over ``data``, in loader order."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    outs, labels, idx = [], [], []
    for x, y, i in data:
        outs.append(module(x.to(device)).float().cpu())
        labels.append(y)
        idx.append(i)
    module.train(was_training)
    return torch.cat(outs).numpy(), torch.cat(labels).numpy(), torch.cat(idx).numpy()


def cached_features(backbone: torch.nn.Module, data: DataLoader) -> TensorDataset:
    """Backbone features computed once, as a dataset of (features, label, index) for head-only training."""
    feats, labels, idx = predict(backbone, data)
    return TensorDataset(torch.from_numpy(feats), torch.from_numpy(labels), torch.from_numpy(idx))
