"""The dataset contract: a folder (or ``s3://`` prefix) with ``labels.csv`` (``image,label``) and the images.

:func:`load_index` validates everything up front and raises one :class:`DataError` that names the first
offenders of each kind and their count, before any step writes anything.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from streetvision.errors import StreetVisionError
from streetvision.io import store
from streetvision.io.atomic import compute_file_sha256

INDEX = "labels.csv"
CLASS_NAMES = ["no_roadwork", "roadwork"]  # label 0 and label 1
SHOW = 3  # offenders named per kind of problem


class DataError(StreetVisionError):
    """The dataset does not meet its contract."""


@dataclass(frozen=True)
class Dataset:
    root: Path
    ids: list[str]  # image paths relative to the index; the id used everywhere
    labels: np.ndarray  # int64, 0/1
    index_sha256: str

    def label_of(self) -> dict[str, int]:
        return dict(zip(self.ids, self.labels.tolist(), strict=True))


def _escapes(root: Path, name: str) -> bool:
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name:
        return True
    return not (root / pure).resolve().is_relative_to(root.resolve())


def _readable(path: Path) -> bool:
    """Decode the image at reduced size: catches unreadable and truncated files cheaply."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
    return True


def load_index(root: str | Path, *, check_images: bool = True) -> Dataset:
    root = Path(root)
    index = root / INDEX
    if not index.is_file():
        raise DataError(f"{root}: no {INDEX} (expected columns image,label)")
    text = index.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or not {"image", "label"} <= set(reader.fieldnames):
        raise DataError(f"{index}: header must contain image,label (found {reader.fieldnames})")
    rows = list(reader)
    if not rows:
        raise DataError(f"{index}: empty index, no images listed")

    bad: dict[str, list[str]] = {}
    seen: set[str] = set()
    ids: list[str] = []
    labels: list[int] = []
    for lineno, row in enumerate(rows, start=2):
        name, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
        if label not in ("0", "1"):
            bad.setdefault("label outside {0,1}", []).append(f"line {lineno} ({label!r})")
        if not name or _escapes(root, name):
            bad.setdefault("path escaping the dataset root", []).append(f"line {lineno} ({name!r})")
            continue
        if name in seen:
            bad.setdefault("duplicate id", []).append(name)
        seen.add(name)
        path = root / name
        if not path.is_file():
            bad.setdefault("missing file", []).append(name)
        elif check_images and not _readable(path):
            bad.setdefault("unreadable or truncated image", []).append(name)
        ids.append(name)
        labels.append(1 if label == "1" else 0)
    if bad:
        parts = [
            f"{kind}: {len(v)} ({', '.join(v[:SHOW])}{', ...' if len(v) > SHOW else ''})"
            for kind, v in bad.items()
        ]
        raise DataError(f"{index}: {sum(map(len, bad.values()))} bad row(s); " + "; ".join(parts))
    return Dataset(root, ids, np.asarray(labels, dtype=np.int64), compute_file_sha256(index))


@contextmanager
def local_dataset(uri: str | Path) -> Iterator[Path]:
    """A local folder holding the dataset: the folder itself, or a download of an ``s3://`` prefix."""
    if not store.is_s3(uri) and not Path(uri).is_dir():
        raise DataError(f"dataset {uri} is not a directory")
    with store.local_tree(uri, prefix="sv-data-") as root:
        yield root


def dataset_input(ds: Dataset, uri: str | None = None) -> dict[str, str]:
    """How a dataset is recorded in a manifest's inputs."""
    return {"uri": uri or str(ds.root), "index_sha256": ds.index_sha256, "images": str(len(ds.ids))}
