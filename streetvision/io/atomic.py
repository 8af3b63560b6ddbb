"""Atomic, hash-as-you-write file output.

Every artifact goes to a temporary file in the destination directory, is fsynced, renamed over the final
name with ``os.replace`` and the directory is fsynced, so a crash leaves either the old file or the new one,
never a partial file under the final name. The SHA-256 is computed from the bytes as they are written, so
a multi-GB checkpoint is never read back just to hash it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class Written:
    """What an atomic write produced: where, how many bytes, and their SHA-256."""

    path: Path
    size: int
    sha256: str


class _HashingWriter(io.RawIOBase):
    """A binary file wrapper that hashes and counts every byte on its way to disk."""

    def __init__(self, raw: IO[bytes]):
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self._raw.write(view)
        self.size += len(view)
        return len(view)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, *, mode: int = 0o644) -> Iterator[_HashingWriter]:
    """Yield a binary writer; on clean exit the file appears under ``path`` atomically.

    On any exception the temporary file is removed and ``path`` is left untouched. After the block,
    ``writer.size`` and ``writer.hexdigest()`` describe the committed bytes.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb", buffering=CHUNK) as raw:
            writer = _HashingWriter(raw)
            yield writer
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_with(path: str | os.PathLike, produce: Callable[[IO[bytes]], Any]) -> Written:
    """Atomically write whatever ``produce(file)`` writes into the binary file object it is given."""
    with atomic_open(path) as f:
        produce(f)  # type: ignore[arg-type]
    return Written(Path(path), f.size, f.hexdigest())


def write_bytes(path: str | os.PathLike, data: bytes) -> Written:
    return write_with(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Written:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Written:
    """Atomically write ``obj`` as indented, key-sorted UTF-8 JSON (stable bytes for stable hashes)."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_npy(path: str | os.PathLike, array) -> Written:
    """Atomically write a numpy array in ``.npy`` format (never pickled objects)."""
    import numpy as np

    arr = np.asarray(array)
    if arr.dtype == object:
        raise TypeError(f"refusing to write an object array to {path}: .npy output must not need pickle")
    return write_with(path, lambda f: np.save(f, arr, allow_pickle=False))


def write_safetensors(
    path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None
) -> Written:
    """Atomically write a dict of torch tensors or numpy arrays as safetensors."""
    first = next(iter(tensors.values()), None)
    if first is not None and type(first).__module__.startswith("torch"):
        from safetensors.torch import save
    else:
        from safetensors.numpy import save
    return write_bytes(path, save(tensors, metadata=metadata))


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> Written:
    """Atomically copy ``src`` to ``dst``, hashing the copy as it is written."""

    def produce(f: IO[bytes]) -> None:
        with open(src, "rb") as s:
            while chunk := s.read(CHUNK):
                f.write(chunk)

    return write_with(dst, produce)


def compute_file_sha256(path: str | os.PathLike) -> str:
    """Stream a file through SHA-256 without loading it whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()
