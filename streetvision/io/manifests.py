"""Step output directories and their manifests.

A step writes its files through :class:`StepOutputs` (atomic, hashed as written) and calls
:meth:`StepOutputs.commit` last, which writes ``manifest.json``. Readers call :func:`verify_dir`: a directory
whose manifest is missing or does not match its files does not exist as far as the pipeline is concerned.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

from streetvision.errors import StreetVisionError
from streetvision.io import atomic

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
_SECRET_NAME = re.compile(r"(secret|token|password|passwd|credential|(^|_)key$|access_?key|api_?key)", re.I)


class ManifestError(StreetVisionError):
    """A step directory is not committed or does not match its manifest."""


@dataclass
class Manifest:
    step: str
    run_id: str
    code_version: str
    config: dict[str, Any]
    config_sha256: str
    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    metrics: dict[str, Any]
    started_at: str
    finished_at: str
    duration_s: float
    host: str = ""
    python: str = ""
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "manifest") -> Manifest:
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where}: not a JSON object")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ManifestError(f"{where}: unsupported schema_version {data.get('schema_version')!r}")
        known = set(cls.__dataclass_fields__)
        missing = {"step", "outputs", "inputs", "config_sha256"} - set(data)
        if missing:
            raise ManifestError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def redact(obj: Any) -> Any:
    """Replace the values of secret-looking keys (key, secret, token, password...) with '***'."""
    if isinstance(obj, Mapping):
        return {k: ("***" if _SECRET_NAME.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    return obj


def sha256_json(obj: Any) -> str:
    """Hash of a JSON value in canonical form (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return hashlib.sha256(blob).hexdigest()


@cache
def code_version() -> str:
    """The git SHA baked into the image, else the checkout's, else the package version."""
    if sha := os.environ.get("STREETVISION_GIT_SHA"):
        return sha
    from streetvision import __version__

    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=Path(__file__).parent,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return __version__


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def check_relative(name: str) -> str:
    """Reject absolute names, '..' and empty parts: an output name must stay inside its directory."""
    p = PurePosixPath(name)
    if (
        not name
        or p.is_absolute()
        or "\\" in name
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise ValueError(f"output name {name!r} must be a relative path inside the step directory")
    return str(p)


class StepOutputs:
    """One step's output directory: atomic, hashed writes, and the manifest written last."""

    def __init__(self, root: str | os.PathLike, step: str):
        self.root = Path(root)
        self.step = step
        self.root.mkdir(parents=True, exist_ok=True)
        # A re-run in the same place first un-commits the old result, so a crash mid-run never leaves an
        # old manifest describing a mix of old and new files.
        if (self.root / MANIFEST).exists():
            (self.root / MANIFEST).unlink()
            atomic.fsync_dir(self.root)
        self.files: dict[str, atomic.Written] = {}
        self.started = time.time()
        self.started_at = _now()

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

    def commit(
        self,
        *,
        config: Mapping[str, Any],
        inputs: Mapping[str, Mapping[str, Any]] | None = None,
        metrics: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Write ``manifest.json`` last; from this moment the directory exists for every reader."""
        clean = redact(dict(config))
        manifest = Manifest(
            step=self.step,
            run_id=run_id or uuid.uuid4().hex,
            code_version=code_version(),
            config=clean,
            config_sha256=sha256_json(clean),
            inputs={k: dict(v) for k, v in (inputs or {}).items()},
            outputs={n: {"sha256": w.sha256, "size": w.size} for n, w in sorted(self.files.items())},
            metrics=dict(metrics or {}),
            started_at=self.started_at,
            finished_at=_now(),
            duration_s=round(time.time() - self.started, 3),
            host=socket.gethostname(),
            python=platform.python_version(),
            extra=dict(extra or {}),
        )
        atomic.write_json(self.root / MANIFEST, manifest.to_dict())
        return manifest


def load_manifest(root: str | os.PathLike) -> Manifest:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ManifestError(
            f"{root}: no {MANIFEST}; the step did not finish (or this is not a step directory)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    return Manifest.from_dict(data, where=str(path))


def problems(root: str | os.PathLike, manifest: Manifest, *, hashes: bool = True) -> list[str]:
    """Every way the files under ``root`` differ from ``manifest``: missing, size, checksum, unlisted.

    ``hashes=False`` skips re-hashing content (sizes and listing only), for a directory this process
    has just written and hashed.
    """
    root = Path(root)
    found: list[str] = []
    for name, meta in sorted(manifest.outputs.items()):
        try:
            check_relative(name)
        except ValueError as e:
            found.append(str(e))
            continue
        p = root / name
        if p.is_symlink() or not p.is_file():
            found.append(f"{name}: missing" if not p.exists() else f"{name}: not a regular file")
        elif p.stat().st_size != meta.get("size"):
            found.append(f"{name}: size {p.stat().st_size} != {meta.get('size')} in manifest")
        elif hashes and atomic.compute_file_sha256(p) != meta.get("sha256"):
            found.append(f"{name}: sha256 differs from manifest")
    listed = set(manifest.outputs) | {MANIFEST}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if (p.is_file() or p.is_symlink()) and rel not in listed and not p.name.startswith("."):
            found.append(f"{rel}: not listed in manifest")
    return found


def verify_dir(root: str | os.PathLike, *, hashes: bool = True) -> Manifest:
    """Return the manifest of a committed, intact step directory, or raise naming every problem."""
    manifest = load_manifest(root)
    found = problems(root, manifest, hashes=hashes)
    if found:
        raise ManifestError(f"{root}: {len(found)} problem(s): " + "; ".join(found))
    return manifest


def is_committed(root: str | os.PathLike) -> bool:
    try:
        verify_dir(root)
    except ManifestError:
        return False
    return True


def input_record(root: str | os.PathLike, uri: str | None = None) -> dict[str, Any]:
    """How a verified step directory is recorded as another step's input: its manifest's hash."""
    return {"uri": uri or str(root), "manifest_sha256": atomic.compute_file_sha256(Path(root) / MANIFEST)}
