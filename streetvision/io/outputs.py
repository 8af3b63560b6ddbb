"""Writing one step's output directory: a lock, a staging folder, atomic hashed files, the manifest last.

A step writes into a hidden staging folder beside its ``--out`` (``.<name>.staging-*``) while it holds a
lock on ``.<name>.lock``; :meth:`StepOutputs.commit` writes ``manifest.json`` last and renames the staging
folder into place. So the output folder only ever appears committed, a second writer of the same output
fails with one line instead of mixing files, and what a killed writer leaves (staging folders, old copies
being replaced) is removed by the next writer.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import shutil
import socket
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from streetvision.io import atomic
from streetvision.io.manifests import (
    MANIFEST,
    Manifest,
    ManifestError,
    check_relative,
    code_version,
    load_manifest,
    redact,
    sha256_json,
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def check_out(final: Path, step: str) -> None:
    """Refuse an output folder whose replacement would destroy something that is not this step's commit."""
    if final.exists() and not final.is_dir():
        raise ManifestError(f"--out {final}: is a file, not a folder")
    for parent in final.absolute().parents:
        if (parent / MANIFEST).is_file():
            raise ManifestError(
                f"--out {final}: lies inside the committed step output {parent}; choose another"
            )
    if not final.is_dir():
        return
    if (final / MANIFEST).exists() or (final / MANIFEST).is_symlink():
        try:
            previous = load_manifest(final)
        except ManifestError as e:
            raise ManifestError(
                f"--out {final}: holds a manifest that cannot be read ({e}); delete it first"
            ) from None
        if previous.step != step:
            raise ManifestError(
                f"--out {final}: holds a {previous.step!r} commit; refusing to replace another step's output"
            )
    elif any(final.iterdir()):
        raise ManifestError(
            f"--out {final}: is not empty and holds no StreetVision commit; refusing to replace it"
        )


class _Lock:
    """An exclusive, non-blocking lock on ``.<name>.lock`` beside the output; the kernel drops it on kill."""

    def __init__(self, final: Path):
        path = final.parent / f".{final.name}.lock"
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ManifestError(f"--out {final}: cannot write in {final.parent} ({e.strerror})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ManifestError(
                f"--out {final}: another process is writing it now; wait for it or choose another --out"
            ) from None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StepOutputs:
    """One step's output directory: atomic, hashed writes into staging, committed by :meth:`commit`.

    Use as a context manager so a step that fails leaves nothing behind: ``with StepOutputs(out, STEP) as
    outputs: ...; return outputs.commit(...)``.
    """

    def __init__(self, final: str | os.PathLike, step: str):
        self.final = Path(final)
        self.step = step
        self._lock = _Lock(self.final)
        try:
            recover(self.final)
            check_out(self.final, step)
            for kind in ("staging", "old"):  # what a killed writer left
                for left in self.final.parent.glob(f".{self.final.name}.{kind}-*"):
                    shutil.rmtree(left, ignore_errors=True)
            self.root = self.final.parent / f".{self.final.name}.staging-{uuid.uuid4().hex[:12]}"
            self.root.mkdir()
        except BaseException:
            self._lock.release()
            raise
        self.files: dict[str, atomic.Written] = {}
        self.started = time.time()
        self.started_at = _now()

    def __enter__(self) -> StepOutputs:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is not None:
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self._lock.release()

    def path(self, name: str) -> Path:
        return self.root / check_relative(name)

    def _record(self, name: str, written: atomic.Written) -> atomic.Written:
        self.files[check_relative(name)] = written
        return written

    def write_bytes(self, name: str, data: bytes) -> atomic.Written:
        return self._record(name, atomic.write_bytes(self.path(name), data))

    def write_text(self, name: str, text: str) -> atomic.Written:
        return self._record(name, atomic.write_text(self.path(name), text))

    def write_json(self, name: str, obj: Any) -> atomic.Written:
        return self._record(name, atomic.write_json(self.path(name), obj))

    def write_npy(self, name: str, array) -> atomic.Written:
        return self._record(name, atomic.write_npy(self.path(name), array))

    def write_safetensors(self, name: str, tensors: dict, metadata: dict[str, str] | None = None):
        return self._record(name, atomic.write_safetensors(self.path(name), tensors, metadata))

    def write_with(self, name: str, produce) -> atomic.Written:
        return self._record(name, atomic.write_with(self.path(name), produce))

    def copy(self, name: str, src: str | os.PathLike) -> atomic.Written:
        return self._record(name, atomic.copy_file(src, self.path(name)))

    def move(self, name: str, src: str | os.PathLike) -> atomic.Written:
        """Take a finished file in (hashed as it is copied, the source removed). Where the output is an
        ``s3://`` prefix it is sent there now (:func:`streetvision.io.store.offload`), so a large output
        never sits whole on local disk."""
        from streetvision.io import store

        written = self.copy(name, src)
        Path(src).unlink()
        store.offload(self.final, name, self.path(name))
        return written

    def commit(
        self,
        *,
        config: Mapping[str, Any],
        inputs: Mapping[str, Mapping[str, Any]] | None = None,
        metrics: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        task: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Write ``manifest.json`` last and rename the staging folder into place."""
        clean = redact(dict(config))
        manifest = Manifest(
            step=self.step,
            run_id=run_id or uuid.uuid4().hex,
            code_version=code_version(),
            config=clean,
            config_sha256=sha256_json(clean),
            inputs={k: redact(dict(v)) for k, v in (inputs or {}).items()},
            outputs={n: {"sha256": w.sha256, "size": w.size} for n, w in sorted(self.files.items())},
            metrics=dict(metrics or {}),
            started_at=self.started_at,
            finished_at=_now(),
            duration_s=round(time.time() - self.started, 3),
            host=socket.gethostname(),
            python=platform.python_version(),
            task=task,
            extra=dict(extra or {}),
        ).sealed()
        try:
            atomic.write_json(self.root / MANIFEST, manifest.to_dict())
            self._swap()
        except BaseException:
            self.abort()
            raise
        self._lock.release()
        return manifest

    def _swap(self) -> None:
        """Put the staging folder in place. Replacing an earlier commit is one atomic exchange of the two
        folders where the kernel and file system offer it (``renameat2(RENAME_EXCHANGE)``), so no kill
        loses both; elsewhere two renames, and the next writer puts back an earlier commit that a kill
        between them left aside (:func:`recover`)."""
        if self.final.exists() and exchange(self.root, self.final):
            atomic.fsync_dir(self.final.parent)
            shutil.rmtree(self.root, ignore_errors=True)  # now the earlier commit
            return
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{uuid.uuid4().hex[:12]}"
            try:
                os.rename(self.final, old)
            except OSError as e:
                if e.errno in (errno.EBUSY, errno.EXDEV):
                    raise ManifestError(
                        f"--out {self.final}: is a mount point and cannot be replaced; "
                        "give a folder inside it (e.g. /out/<step>)"
                    ) from None
                raise
        os.rename(self.root, self.final)
        atomic.fsync_dir(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h


@cache
def _renameat2():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically; False where the system cannot (then nothing has changed)."""
    fn = _renameat2() if platform.system() == "Linux" else None
    if fn is None:
        return False
    at_cwd = -100  # AT_FDCWD
    return fn(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def clean_folder(final: Path) -> str:
    """Under the output's lock: an earlier commit a killed writer left aside put back, its staging and
    replaced copies removed. Returns what the folder holds now."""
    lock = _Lock(final)
    try:
        recover(final)
        for kind in ("staging", "old"):
            for left in final.parent.glob(f".{final.name}.{kind}-*"):
                shutil.rmtree(left, ignore_errors=True)
    finally:
        lock.release()
    return "committed" if (final / MANIFEST).is_file() else "no commit"


def recover(final: Path) -> None:
    """Put back an earlier commit that a writer killed between its two renames left aside (the output
    folder gone, the commit in ``.<name>.old-*``); called under the output's lock."""
    if final.exists() or final.is_symlink():
        return
    for old in sorted(
        final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True
    ):
        if (old / MANIFEST).is_file():
            os.rename(old, final)
            atomic.fsync_dir(final.parent)
            return
