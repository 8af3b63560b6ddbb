"""Stratified, seeded splits into train / val_select / val_calib / val_test.

Per class, ids are shuffled with the seed and cut by largest-remainder rounding, so every split holds
within one image per class of its requested share. ``val_test`` is for final evaluation only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from streetvision.errors import StreetVisionError

SPLITS = ("train", "val_select", "val_calib", "val_test")


class SplitError(StreetVisionError):
    """The requested split cannot be made from this dataset."""


def _counts(n: int, ratios: Sequence[float]) -> list[int]:
    exact = np.asarray(ratios, dtype=np.float64) * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def check_ratios(ratios: Sequence[float]) -> None:
    if len(ratios) != len(SPLITS) or any(r <= 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise SplitError(
            f"split ratios {list(ratios)} must be {len(SPLITS)} positive numbers summing to 1 ({', '.join(SPLITS)})"
        )


def stratified_split(
    ids: Sequence[str], labels: np.ndarray, ratios: Sequence[float], seed: int
) -> dict[str, list[str]]:
    check_ratios(ratios)
    ids = np.asarray(ids)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[str]] = {name: [] for name in SPLITS}
    per_class: dict[str, list[int]] = {name: [0, 0] for name in SPLITS}
    for cls in (0, 1):
        members = ids[labels == cls]
        members = members[rng.permutation(len(members))]
        start = 0
        for name, ratio, count in zip(SPLITS, ratios, _counts(len(members), ratios), strict=True):
            parts[name] += members[start : start + count].tolist()
            per_class[name][cls] = count
            start += count
            # The promise, checked rather than assumed: within one image per class of the request.
            assert abs(count - ratio * len(members)) < 1.0 + 1e-9, (name, cls, count)
    have = [int((labels == c).sum()) for c in (0, 1)]
    for name in SPLITS:
        if 0 in per_class[name]:
            raise SplitError(
                f"split {name!r} would hold {per_class[name][1]} positive and {per_class[name][0]} negative images; "
                f"every split needs both classes. The dataset has {have[1]} positive and {have[0]} negative images, "
                f"too few for ratios {list(ratios)}"
            )
        parts[name].sort()
    return parts
