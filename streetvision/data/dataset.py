"""The dataset contract: a folder (or ``s3://`` prefix) in one of three layouts, read as one index.

- ``csv``: ``labels.csv`` (``image,label``) and the images it names, by paths relative to it;
- ``parquet``: Hugging Face parquet shards (``*.parquet``), an image column of ``{bytes, path}`` structs
  (or plain bytes) and a label column, read row group by row group, never whole;
- ``imagefolder``: one subfolder per class, every image under it.

Labels are mapped to 0/1 by ``source.labels`` (a label value or folder name -> 0 or 1). An image's id is
its path (the csv row, the file under the class folder, the struct's ``path``; ``<shard>#<row>`` where a
parquet row has none). :func:`load_index` reads ids and labels only, never image bytes, and raises one
:class:`DataError` naming the first offenders of each kind and their count. The dataset's identity,
:func:`content_sha256`, covers every id, label and image's bytes, so one dataset written in the three
layouts has one identity.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streetvision.config import require
from streetvision.errors import StreetVisionError
from streetvision.io import store
from streetvision.io.hashcache import HashCache
from streetvision.io.paths import PathEscape, canonical, relative_name

INDEX = "labels.csv"
CLASS_NAMES = ["no_roadwork", "roadwork"]  # label 0 and label 1
SHOW = 3  # offenders named per kind of problem
FORMATS = ("auto", "csv", "parquet", "imagefolder")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
FETCH_THREADS = 16  # concurrent GETs when images are objects


class DataError(StreetVisionError):
    """The dataset does not meet its contract."""


@dataclass
class SourceConfig:
    """How a dataset is laid out: its format (auto: labels.csv, else parquet shards, else class folders),
    the parquet columns, and the label values (or class folder names) that mean 0 and 1."""

    format: str = "auto"
    image_column: str = "image"
    label_column: str = "label"
    labels: dict[str, int] = field(
        default_factory=lambda: {"0": 0, "1": 1, CLASS_NAMES[0]: 0, CLASS_NAMES[1]: 1}
    )

    def check(self) -> None:
        require(self.format in FORMATS, "source.format", self.format, ", ".join(FORMATS))
        for key in ("image_column", "label_column"):
            require(bool(getattr(self, key).strip()), f"source.{key}", getattr(self, key), "a column name")
        require(
            set(self.labels.values()) == {0, 1},
            "source.labels",
            dict(self.labels),
            "label values (or class folder names) mapped to 0 and 1, both present",
        )


@dataclass(frozen=True)
class Dataset:
    uri: str
    format: str
    ids: list[str]  # the id used everywhere
    labels: np.ndarray  # int64, 0/1
    index_sha256: str  # ids and labels: what make_splits reads
    where: list[tuple[str, int]]  # per image: (file, -1), or (parquet shard, row in the shard)
    listing: str  # the objects read, by name, size and ETag or mtime: a cheap fingerprint of the bytes
    column: str = ""  # parquet: the image column
    content_sha256: str = ""  # set by :func:`with_content`: ids, labels and every image's bytes

    def label_of(self) -> dict[str, int]:
        return dict(zip(self.ids, self.labels.tolist(), strict=True))


def index_sha256(ids: list[str], labels) -> str:
    """The identity of an index: every id and its label, in id order, whatever the layout."""
    lines = sorted(f"{i}\t{int(y)}" for i, y in zip(ids, labels, strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def content_sha256(ds: Dataset, image_sha256: dict[str, str]) -> str:
    """The dataset's identity: every id, its label and its image's bytes, in id order."""
    lines = sorted(f"{i}\t{int(y)}\t{image_sha256[i]}" for i, y in zip(ds.ids, ds.labels, strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _files(uri: str) -> dict[str, tuple[int, str]]:
    """Every file under a folder or prefix: relative name -> (size, ETag or modification time)."""
    if store.is_s3(uri):
        return store.list_objects(uri)
    root = Path(uri)
    found = {}
    for path in root.rglob("*"):
        if path.is_file():
            st = path.stat()
            found[path.relative_to(root).as_posix()] = (st.st_size, str(st.st_mtime_ns))
    return found


def _format(uri: str, files: dict, wanted: str) -> str:
    if wanted != "auto":
        return wanted
    if INDEX in files:
        return "csv"
    if any(n.endswith(".parquet") for n in files):
        return "parquet"
    return "imagefolder"


class _Problems:
    def __init__(self) -> None:
        self.bad: dict[str, list[str]] = {}

    def add(self, kind: str, what: str) -> None:
        self.bad.setdefault(kind, []).append(what)

    def raise_if_any(self, where: str) -> None:
        if self.bad:
            parts = [
                f"{kind}: {len(v)} ({', '.join(v[:SHOW])}{', ...' if len(v) > SHOW else ''})"
                for kind, v in self.bad.items()
            ]
            n = sum(map(len, self.bad.values()))
            raise DataError(f"{where}: {n} bad row(s); " + "; ".join(parts))


def _reason(e: Exception) -> str:
    """An exception's first line, printable characters only (a parser may quote the bytes it choked on)."""
    first = (str(e).splitlines() or [type(e).__name__])[0]
    return "".join(c for c in first if c.isprintable())[:80]


def _label(value, labels: dict[str, int]) -> int | None:
    key = str(value).strip() if value is not None else None
    return labels.get(key) if key is not None else None


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


def _csv(uri: str, files: dict, source: SourceConfig, bad: _Problems):
    index = store.join(uri, INDEX)
    if INDEX not in files:
        raise DataError(f"{uri}: no {INDEX} (expected columns image,label)")
    raw = store.read_bytes(index) if store.is_s3(uri) else Path(index).read_bytes()
    for lineno, row in enumerate(_rows(raw, index), start=2):
        written, value = (row.get("image") or "").strip(), row.get("label")
        label = _label(value, source.labels)
        if label is None:
            bad.add("label outside source.labels", f"line {lineno} ({(value or '').strip()!r})")
        try:  # one file, one id: ./a.jpg, a//b.jpg and a link to a file are that file's own path
            name = relative_name(written) if store.is_s3(uri) else canonical(uri, written)
        except PathEscape:
            bad.add("path escaping the dataset root", f"line {lineno} ({written!r})")
            continue
        if name not in files and not (not store.is_s3(uri) and Path(uri, name).is_file()):
            bad.add("missing file", name)
        yield name, 0 if label is None else label, (name, -1), lineno, written


def _imagefolder(uri: str, files: dict, source: SourceConfig, bad: _Problems):
    for name in sorted(files):
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            continue  # a README, a metadata file
        folder, _, rest = name.partition("/")
        if not rest:
            bad.add("image outside a class folder", name)
            continue
        label = source.labels.get(folder)
        if label is None:
            bad.add("class folder not in source.labels", name)
            continue
        if not store.is_s3(uri):
            try:
                canonical(uri, name)
            except PathEscape:
                bad.add("path escaping the dataset root", name)
                continue
        yield name, label, (name, -1), None, name


def parquet_file(uri: str, name: str):
    """A ``pyarrow.parquet.ParquetFile`` of a shard, read by ranges (on the object store too)."""
    import pyarrow.parquet as pq

    where = store.join(uri, name)
    if store.is_s3(where):
        return pq.ParquetFile(store.arrow_fs().open_input_file(where[len("s3://") :]))
    return pq.ParquetFile(where)


def _parquet(uri: str, files: dict, source: SourceConfig, bad: _Problems):
    import pyarrow as pa

    shards = sorted(n for n in files if n.endswith(".parquet"))
    if not shards:
        raise DataError(f"{uri}: no *.parquet shards")
    image, label_col = source.image_column, source.label_column
    for shard in shards:
        where = store.join(uri, shard)
        try:
            pf = parquet_file(uri, shard)
        except (pa.ArrowException, OSError) as e:
            bad.add("unreadable parquet file", f"{shard} ({_reason(e)})")
            continue
        schema = pf.schema_arrow
        for col in (image, label_col):
            if col not in schema.names:
                raise DataError(f"{where}: no column {col!r} (columns: {', '.join(schema.names)}); "
                                f"set source.image_column / source.label_column")  # fmt: skip
        kind = schema.field(image).type
        paths = pa.types.is_struct(kind) and kind.get_field_index("path") >= 0
        row = 0
        for g in range(pf.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            try:
                table = pf.read_row_group(g, columns=[f"{image}.path" if paths else label_col, label_col])
                names = table.column(0).combine_chunks().field("path").to_pylist() if paths else [None] * size
                values = table.column(label_col).to_pylist()
            except (pa.ArrowException, OSError) as e:
                bad.add("unreadable row group", f"{shard} group {g} ({_reason(e)})")
                row += size
                continue
            for k, (path, value) in enumerate(zip(names, values, strict=True)):
                label = _label(value, source.labels)
                if label is None:
                    bad.add("label outside source.labels", f"{shard} row {row + k} ({value!r})")
                ident = path if path else f"{shard}#{row + k}"
                yield ident, 0 if label is None else label, (shard, row + k), None, ident
            row += size


def load_index(uri: str | Path, source: SourceConfig | None = None) -> Dataset:
    """The validated index (ids and labels) of the dataset at a folder or ``s3://`` prefix; no image is
    read. Every bad row is counted and the first of each kind named, in one error."""
    source, uri = source or SourceConfig(), str(uri)
    if not store.is_s3(uri) and not Path(uri).is_dir():
        raise DataError(f"dataset {uri} is not a directory")
    files = _files(uri)
    if not files:
        raise DataError(f"dataset {uri}: no files")
    fmt = _format(uri, files, source.format)
    folders = {n.partition("/")[0] for n in files if "/" in n and Path(n).suffix.lower() in IMAGE_SUFFIXES}
    if source.format == "auto" and fmt == "imagefolder" and not folders & set(source.labels):
        raise DataError(
            f"dataset {uri}: no {INDEX}, no *.parquet shards, and no image under a class folder named in "
            f"source.labels (folders with images: {', '.join(sorted(folders)[:SHOW]) or 'none'})"
        )
    read = {"csv": _csv, "imagefolder": _imagefolder, "parquet": _parquet}[fmt]
    bad, seen = _Problems(), set()
    ids, labels, where = [], [], []
    for ident, label, at, lineno, written in read(uri, files, source, bad):
        if ident in seen:
            alias = "" if ident == written else f" as {written!r}"
            bad.add("duplicate id", f"line {lineno} ({ident}{alias})" if lineno else ident)
            continue
        seen.add(ident)
        ids.append(ident)
        labels.append(label)
        where.append(at)
    if not ids and not bad.bad:
        raise DataError(f"dataset {uri}: no images ({fmt} layout)")
    bad.raise_if_any(store.join(uri, INDEX) if fmt == "csv" else f"dataset {uri} ({fmt})")
    read_names = sorted({w[0] for w in where} | ({INDEX} if fmt == "csv" else set()))
    listing = "\n".join(f"{n} {files[n][0]} {files[n][1]}" for n in read_names if n in files)
    labels_arr = np.asarray(labels, dtype=np.int64)
    return Dataset(uri, fmt, ids, labels_arr, index_sha256(ids, labels_arr), where,
                   hashlib.sha256(listing.encode()).hexdigest(), source.image_column if fmt == "parquet" else "")  # fmt: skip


def image_bytes(ds: Dataset, positions: list[int] | None = None) -> Iterator[tuple[int, bytes | None]]:
    """(position in the index, the image's bytes) of the images at ``positions`` (default all), in index
    order; None for bytes that cannot be read (a parquet row group that does not decode)."""
    wanted = range(len(ds.ids)) if positions is None else sorted(positions)
    if ds.format != "parquet":
        if not store.is_s3(ds.uri):
            for p in wanted:
                yield p, Path(ds.uri, ds.where[p][0]).read_bytes()
            return
        with ThreadPoolExecutor(FETCH_THREADS) as pool:  # in order, a bounded window in flight
            window = list(wanted)
            for start in range(0, len(window), 4 * FETCH_THREADS):
                part = window[start : start + 4 * FETCH_THREADS]
                uris = [store.join(ds.uri, ds.where[p][0]) for p in part]
                yield from zip(part, pool.map(store.read_bytes, uris), strict=True)
        return
    yield from _parquet_bytes(ds, wanted)


def _parquet_bytes(ds: Dataset, wanted) -> Iterator[tuple[int, bytes | None]]:
    import pyarrow as pa

    by_shard: dict[str, dict[int, int]] = {}
    for p in wanted:
        shard, row = ds.where[p]
        by_shard.setdefault(shard, {})[row] = p
    image = ds.column
    for shard in sorted(by_shard):
        rows = by_shard[shard]
        pf = parquet_file(ds.uri, shard)
        kind = pf.schema_arrow.field(image).type
        start = 0
        for g in range(pf.num_row_groups):
            size = pf.metadata.row_group(g).num_rows
            here = [r for r in range(start, start + size) if r in rows]
            if here:
                try:
                    col = pf.read_row_group(g, columns=[image]).column(0).combine_chunks()
                    data = col.field("bytes") if pa.types.is_struct(kind) else col
                    for r in here:
                        yield rows[r], data[r - start].as_py()
                except (pa.ArrowException, OSError):
                    for r in here:
                        yield rows[r], None
            start += size


def content_identity(uri: str | Path, source: SourceConfig | None = None) -> str:
    """:func:`content_sha256` of the dataset at a folder or prefix: every image's bytes hashed (local
    files and objects remembered by path and mtime or ETag, so a re-run does not read them again)."""
    source = source or SourceConfig()
    ds = load_index(uri, source)
    hashes: dict[str, str] = {}
    if ds.format == "parquet":
        for p, data in image_bytes(ds):
            hashes[ds.ids[p]] = hashlib.sha256(data or b"").hexdigest()
        return content_sha256(ds, hashes)
    files = _files(ds.uri)
    with HashCache() as cache:
        for p, name in enumerate(w[0] for w in ds.where):
            key = f"{'s3' if store.is_s3(ds.uri) else 'file'}:{store.join(ds.uri, name)}|{files[name][0]}|{files[name][1]}"
            if not (found := cache.get(key)):
                data = (
                    store.read_bytes(store.join(ds.uri, name))
                    if store.is_s3(ds.uri)
                    else Path(ds.uri, name).read_bytes()
                )
                found = cache.put(key, hashlib.sha256(data).hexdigest())
            hashes[ds.ids[p]] = found
    return content_sha256(ds, hashes)


def with_content(ds: Dataset) -> Dataset:
    """A local dataset of image files with its content identity, every image decoded at reduced size
    first (unreadable and truncated ones reported together): for the steps that read image files rather
    than a pack."""
    if ds.format == "parquet" or store.is_s3(ds.uri):
        raise DataError(f"dataset {ds.uri}: this step reads image files from a folder; pack a "
                        f"{ds.format} dataset with pack_shards")  # fmt: skip
    bad, hashes = _Problems(), {}
    with HashCache() as cache:
        for ident, (name, _) in zip(ds.ids, ds.where, strict=True):
            path = Path(ds.uri, name)
            if not readable(path.read_bytes()):
                bad.add("unreadable or truncated image", name)
            else:
                hashes[ident] = cache.file_sha256(path)
    bad.raise_if_any(store.join(ds.uri, INDEX) if ds.format == "csv" else f"dataset {ds.uri}")
    return dataclasses.replace(ds, content_sha256=content_sha256(ds, hashes))


def fingerprint(uri: str | Path, source: SourceConfig | None = None) -> str:
    """A cheap identity of what a dataset holds now, for Kubeflow's cache key and ``streetvision run``'s
    up-to-date check: its index and the name, size and ETag (or modification time) of every object it
    reads; a listing, no image read. Rewriting an image or the index in place changes it."""
    ds = load_index(uri, source)
    return hashlib.sha256(f"{ds.index_sha256}\n{ds.listing}".encode()).hexdigest()


@contextmanager
def local_dataset(uri: str | Path) -> Iterator[Path]:
    """A local folder holding the dataset: the folder itself, or a download of an ``s3://`` prefix (for
    the steps that read image files rather than a pack)."""
    if not store.is_s3(uri) and not Path(uri).is_dir():
        raise DataError(f"dataset {uri} is not a directory")
    with store.local_tree(uri, prefix="sv-data-") as root:
        yield root


def dataset_input(ds: Dataset, uri: str | None = None, **more: str) -> dict[str, str]:
    """How a dataset is recorded in a manifest's inputs."""
    return {"uri": uri or ds.uri, "format": ds.format, "index_sha256": ds.index_sha256,
            "fingerprint": hashlib.sha256(f"{ds.index_sha256}\n{ds.listing}".encode()).hexdigest(),
            "images": str(len(ds.ids)), **({"content_sha256": ds.content_sha256} if ds.content_sha256 else {}),
            **more}  # fmt: skip


def readable(data: bytes) -> bool:
    """Whether image bytes decode (at reduced size): catches unreadable and truncated files cheaply."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (64, 64))
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
    return True


def unlabelled_images(root: str | Path, where: str) -> tuple[list[Path], str]:
    """(every image file under a folder, sorted; their content identity): images without an index, such
    as adapt_explora's extra images. Each is decoded at reduced size first; ``where`` names the folder."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{where}: not a folder")
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise DataError(f"{where}: no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    bad = [f.relative_to(root).as_posix() for f in files if not readable(f.read_bytes())]
    if bad:
        raise DataError(f"{where}: {len(bad)} unreadable or truncated image(s) ({', '.join(bad[:SHOW])})")
    with HashCache() as cache:
        lines = [f"{f.relative_to(root).as_posix()} {cache.file_sha256(f)}" for f in files]
    return files, hashlib.sha256("\n".join(lines).encode()).hexdigest()
