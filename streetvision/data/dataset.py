"""The dataset contract: a folder (or ``s3://`` prefix) with ``labels.csv`` (``image,label``) and the images.

:func:`load_index` validates everything up front and raises one :class:`DataError` that names the first
offenders of each kind and their count, before any step writes anything.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streetvision.errors import StreetVisionError
from streetvision.io import store
from streetvision.io.atomic import compute_file_sha256
from streetvision.io.hashcache import HashCache
from streetvision.io.paths import PathEscape, canonical, relative_name

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
    content_sha256: str  # the index and every listed image's bytes: the dataset's identity

    def label_of(self) -> dict[str, int]:
        return dict(zip(self.ids, self.labels.tolist(), strict=True))


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


def content_sha256(index_sha256: str, image_sha256: dict[str, str]) -> str:
    """The dataset's identity: its index and the content of every image it lists (by id)."""
    lines = [f"{INDEX} {index_sha256}", *(f"{i} {image_sha256[i]}" for i in sorted(image_sha256))]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _rows(raw: bytes, where: str) -> list[dict[str, str]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte {e.start}); save the index as UTF-8 CSV") from None
    reader = csv.DictReader(io.StringIO(text))
    try:
        if reader.fieldnames is None or not {"image", "label"} <= set(reader.fieldnames):
            raise DataError(f"{where}: header must contain image,label (found {reader.fieldnames})")
        rows = list(reader)
    except csv.Error as e:  # a NUL byte, a field past the csv module's limit
        raise DataError(f"{where}: not a CSV index (line {reader.line_num}: {e})") from None
    if not rows:
        raise DataError(f"{where}: empty index, no images listed")
    return rows


def load_index(root: str | Path, *, check_images: bool = True) -> Dataset:
    """The validated dataset at ``root``; its identity covers every image's content (hashes cached)."""
    root = Path(root)
    index = root / INDEX
    if not index.is_file():
        raise DataError(f"{root}: no {INDEX} (expected columns image,label)")
    rows = _rows(index.read_bytes(), str(index))

    bad: dict[str, list[str]] = {}
    seen: set[str] = set()
    ids: list[str] = []
    labels: list[int] = []
    hashes: dict[str, str] = {}
    with HashCache() as cache:
        for lineno, row in enumerate(rows, start=2):
            written, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
            if label not in ("0", "1"):
                bad.setdefault("label outside {0,1}", []).append(f"line {lineno} ({label!r})")
            try:  # one file, one id: ./a.jpg, a//b.jpg and a link to a file are that file's own path
                name = canonical(root, written)
            except PathEscape:
                bad.setdefault("path escaping the dataset root", []).append(f"line {lineno} ({written!r})")
                continue
            if name in seen:
                alias = "" if name == written else f" as {written!r}"
                bad.setdefault("duplicate id", []).append(f"line {lineno} ({name}{alias})")
            seen.add(name)
            path = root / name
            if not path.is_file():
                bad.setdefault("missing file", []).append(name)
            elif check_images and not _readable(path):
                bad.setdefault("unreadable or truncated image", []).append(name)
            else:
                hashes[name] = cache.file_sha256(path)
            ids.append(name)
            labels.append(1 if label == "1" else 0)
    if bad:
        parts = [
            f"{kind}: {len(v)} ({', '.join(v[:SHOW])}{', ...' if len(v) > SHOW else ''})"
            for kind, v in bad.items()
        ]
        raise DataError(f"{index}: {sum(map(len, bad.values()))} bad row(s); " + "; ".join(parts))
    index_sha = compute_file_sha256(index)
    return Dataset(
        root, ids, np.asarray(labels, dtype=np.int64), index_sha, content_sha256(index_sha, hashes)
    )


@contextmanager
def local_dataset(uri: str | Path) -> Iterator[Path]:
    """A local folder holding the dataset: the folder itself, or a download of an ``s3://`` prefix."""
    if not store.is_s3(uri) and not Path(uri).is_dir():
        raise DataError(f"dataset {uri} is not a directory")
    with store.local_tree(uri, prefix="sv-data-") as root:
        yield root


def dataset_input(ds: Dataset, uri: str | None = None) -> dict[str, str]:
    """How a dataset is recorded in a manifest's inputs."""
    return {
        "uri": uri or str(ds.root),
        "index_sha256": ds.index_sha256,
        "content_sha256": ds.content_sha256,
        "images": str(len(ds.ids)),
    }


def _object_name(row: dict[str, str]) -> str:
    """A row's image key under an ``s3://`` prefix, spelt as :func:`load_index` spells its id (an object
    store has no links to follow); a name that cannot be one is returned as written, which no key is."""
    written = (row.get("image") or "").strip()
    try:
        return relative_name(written)
    except PathEscape:
        return written


def content_identity(uri: str | Path) -> str:
    """``content_sha256`` of the dataset at a folder or ``s3://`` prefix, without decoding any image.

    On the object store, objects are hashed once and then known by their ETag, so a re-run lists the
    prefix instead of downloading it.
    """
    if not store.is_s3(uri):
        return load_index(uri, check_images=False).content_sha256
    raw = store.read_bytes(store.join(str(uri), INDEX))
    objects = store.list_objects(str(uri))
    hashes: dict[str, str] = {}
    with HashCache() as cache:
        for row in _rows(raw, store.join(str(uri), INDEX)):
            name = _object_name(row)
            if name not in objects:
                return f"missing image {name}"
            obj = store.join(str(uri), name)
            key = f"s3:{obj}|{objects[name][0]}|{objects[name][1]}"
            hashes[name] = cache.get(key) or cache.put(key, hashlib.sha256(store.read_bytes(obj)).hexdigest())
    return content_sha256(hashlib.sha256(raw).hexdigest(), hashes)


def fingerprint(uri: str | Path) -> str:
    """A cheap identity of what a dataset holds now, for Kubeflow's cache key: on the object store, the
    SHA-256 of ``labels.csv`` and of every listed image's key, size and ETag (a listing, no download);
    locally, :func:`content_identity`. Rewriting an image or the index in place changes it."""
    if not store.is_s3(uri):
        if not Path(uri).is_dir():
            raise DataError(f"dataset {uri} is not a directory")
        return content_identity(uri)
    index = store.join(str(uri), INDEX)
    raw = store.read_bytes(index)
    objects = store.list_objects(str(uri))
    lines = [f"{INDEX} {hashlib.sha256(raw).hexdigest()}"]
    for row in _rows(raw, index):
        name = _object_name(row)
        size, etag = objects.get(name, (-1, "missing"))
        lines.append(f"{name} {size} {etag}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def unlabelled_images(root: str | Path, where: str) -> tuple[list[Path], str]:
    """(every image file under a folder, sorted; their content identity): images without an index, such
    as adapt_explora's extra images. Each is decoded at reduced size first; ``where`` names the folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{where}: not a folder")
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise DataError(f"{where}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    bad = [f.relative_to(root).as_posix() for f in files if not _readable(f)]
    if bad:
        raise DataError(f"{where}: {len(bad)} unreadable or truncated image(s) ({', '.join(bad[:SHOW])})")
    with HashCache() as cache:
        lines = [f"{f.relative_to(root).as_posix()} {cache.file_sha256(f)}" for f in files]
    return files, hashlib.sha256("\n".join(lines).encode()).hexdigest()
