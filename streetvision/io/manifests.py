"""Step manifests, and the one verification every reader goes through.

A step writes its files through :class:`streetvision.io.outputs.StepOutputs`, which writes
``manifest.json`` last. :func:`verify_dir` is what every reader calls first (the next step,
``export-bundle``, ``predict``, ``run``'s up-to-date check and ``verify``): it requires ``manifest.json``
as a plain file, checks its shape, its own hash and the step it names, and then that the directory holds
exactly the listed files (no more, no links, no extra folders) with their sizes and SHA-256. A directory
that fails any of this does not exist as far as the pipeline is concerned.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

from streetvision.config import strict_json
from streetvision.errors import StreetVisionError
from streetvision.io import atomic
from streetvision.io.paths import PathEscape, relative_name

MANIFEST = "manifest.json"
SCHEMA_VERSION = 2
_SECRET_NAME = re.compile(r"(secret|token|password|passwd|credential|(^|_)key$|access_?key|api_?key)", re.I)
_URI_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(StreetVisionError):
    """A step directory is not committed or does not match its manifest."""


# Input names of manifests committed before a rename -> today's name (train_baseline's output was phase1).
FORMER_INPUT_NAMES = {"phase1": "baseline"}


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
    task: str = ""  # the Kubeflow task that wrote it, when run by Kubeflow
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    self_sha256: str = ""  # sha256_json of every other field: an edited field is caught

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sealed(self) -> Manifest:
        body = {k: v for k, v in self.to_dict().items() if k != "self_sha256"}
        return Manifest(**{**body, "self_sha256": sha256_json(body)})


_TYPES: dict[str, type | tuple[type, ...]] = {
    "step": str,
    "run_id": str,
    "code_version": str,
    "config": dict,
    "config_sha256": str,
    "inputs": dict,
    "outputs": dict,
    "metrics": dict,
    "started_at": str,
    "finished_at": str,
    "duration_s": (int, float),
    "host": str,
    "python": str,
    "task": str,
    "schema_version": int,
    "extra": dict,
    "self_sha256": str,
}


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """A manifest from its bytes, checked for shape, its own hash and its config hash."""
    try:
        data = strict_json(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: not a JSON object")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(
            f"{where}: unsupported schema_version {data.get('schema_version')!r} "
            f"(this version reads {SCHEMA_VERSION}); re-run the step"
        )
    names = {f.name for f in fields(Manifest)}
    if missing := names - set(data):
        raise ManifestError(f"{where}: missing field(s) {', '.join(sorted(missing))}")
    if unknown := set(data) - names:
        raise ManifestError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    for name, kind in _TYPES.items():
        if not isinstance(data[name], kind) or isinstance(data[name], bool):
            raise ManifestError(f"{where}: field {name!r} has the wrong type ({type(data[name]).__name__})")
    for name, meta in data["outputs"].items():
        try:
            check_relative(name)
        except ValueError as e:
            raise ManifestError(f"{where}: {e}") from None
        ok = isinstance(meta, dict) and set(meta) == {"sha256", "size"}
        if not (ok and _HEX64.match(str(meta["sha256"])) and type(meta["size"]) is int and meta["size"] >= 0):
            raise ManifestError(f"{where}: output {name!r} needs exactly a sha256 (64 hex) and a size")
    if not all(isinstance(v, dict) for v in data["inputs"].values()):
        raise ManifestError(f"{where}: every input must be a JSON object")
    manifest = Manifest(**data)
    if manifest.sealed().self_sha256 != manifest.self_sha256:
        raise ManifestError(f"{where}: edited (its fields no longer match its self_sha256)")
    if sha256_json(manifest.config) != manifest.config_sha256:
        raise ManifestError(f"{where}: config_sha256 does not match its config")
    for old, new in FORMER_INPUT_NAMES.items():  # read under today's name, after the hash is checked
        if old in manifest.inputs and new not in manifest.inputs:
            manifest.inputs[new] = manifest.inputs.pop(old)
    return manifest


def redact(obj: Any) -> Any:
    """Replace secret-looking keys' values (key, secret, token...) and credentials inside URIs with '***'."""
    if isinstance(obj, Mapping):
        return {k: ("***" if _SECRET_NAME.search(str(k)) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def redact_text(text: str) -> str:
    """``scheme://user:password@host`` -> ``scheme://***@host``: a credential in a URI is never echoed."""
    return _URI_USERINFO.sub(r"\1***@", text)


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

    here = Path(__file__).parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return __version__


def check_relative(name: str) -> str:
    """An output name in its one spelling (:func:`streetvision.io.paths.relative_name`, and already
    written so): it must stay inside its directory."""
    try:
        if relative_name(name) == name:
            return name
    except PathEscape:
        pass
    raise ValueError(f"output name {name!r} must be a relative path inside the step directory")


def expected_step(where: str, manifest: Manifest, step: str | None) -> None:
    if step is not None and manifest.step != step:
        raise ManifestError(f"{where}: holds a {manifest.step!r} commit, but a {step!r} commit is expected")


def load_manifest(root: str | os.PathLike, step: str | None = None) -> Manifest:
    """The checked manifest of ``root`` (a plain file, naming ``step`` when given); files not yet checked."""
    root = Path(root)
    path = root / MANIFEST
    if path.is_symlink():
        raise ManifestError(f"{path}: is a symbolic link; a commit's manifest must be a plain file")
    if not path.is_file():
        what = "no such folder" if not root.exists() else f"no {MANIFEST}"
        raise ManifestError(f"{root}: {what}; the step did not finish there (or this is not a step output)")
    manifest = parse_manifest(path.read_bytes(), str(path))
    expected_step(str(root), manifest, step)
    return manifest


def problems(
    root: str | os.PathLike, manifest: Manifest, *, hashes: bool = True, absent: frozenset[str] = frozenset()
) -> list[str]:
    """Every way the tree under ``root`` differs from ``manifest``: missing, size, checksum, links, extras.

    ``hashes=False`` skips re-hashing content (sizes and listing only), for a directory this process
    has just written and hashed; ``absent``: outputs it sent elsewhere already (checked there).
    """
    root = Path(root)
    found: list[str] = []
    for name, meta in sorted(manifest.outputs.items()):
        if name in absent:
            continue
        p = root / name
        linked = [q for q in [p, *p.parents] if q != root and q.is_relative_to(root) and q.is_symlink()]
        if linked:
            found.append(f"{name}: {linked[-1].relative_to(root).as_posix()} is a symbolic link")
        elif not p.is_file():
            found.append(f"{name}: missing" if not p.exists() else f"{name}: not a regular file")
        elif p.stat().st_size != meta["size"]:
            found.append(f"{name}: size {p.stat().st_size} != {meta['size']} in manifest")
        elif hashes and atomic.compute_file_sha256(p) != meta["sha256"]:
            found.append(f"{name}: sha256 differs from manifest")
    listed = set(manifest.outputs) | {MANIFEST}
    folders = {parent.as_posix() for n in listed for parent in PurePosixPath(n).parents} - {"."}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in sorted(filenames):
            rel = (base / name).relative_to(root).as_posix()
            if rel not in listed:
                found.append(f"{rel}: not listed in manifest")
        for name in sorted(dirnames):
            rel = (base / name).relative_to(root).as_posix()
            if rel not in folders and not (base / name).is_symlink():
                found.append(f"{rel}/: folder not listed in manifest")
            elif (base / name).is_symlink() and not any(n.startswith(rel + "/") for n in listed):
                found.append(f"{rel}: not listed in manifest")
    return found


def verify_dir(
    root: str | os.PathLike,
    step: str | None = None,
    *,
    hashes: bool = True,
    absent: frozenset[str] = frozenset(),
) -> Manifest:
    """The manifest of a committed, intact step directory (of ``step``, when given); else raise naming
    every problem on one line."""
    manifest = load_manifest(root, step)
    found = problems(root, manifest, hashes=hashes, absent=absent)
    if found:
        raise ManifestError(f"{root}: {len(found)} problem(s): " + "; ".join(found))
    return manifest


def input_record(root: str | os.PathLike, uri: str | None = None) -> dict[str, Any]:
    """How a verified step directory is recorded as another step's input: its manifest's hash."""
    return {"uri": uri or str(root), "manifest_sha256": manifest_sha256(root)}


def manifest_sha256(root: str | os.PathLike) -> str:
    """The SHA-256 of a step folder's (or ``s3://`` prefix's) ``manifest.json``."""
    if str(root).startswith("s3://"):
        import hashlib

        from streetvision.io import store

        return hashlib.sha256(store.read_bytes(store.join(str(root), MANIFEST))).hexdigest()
    return atomic.compute_file_sha256(Path(root) / MANIFEST)


def check_lineage(
    what: str, manifest: Manifest, name: str, upstream: str | os.PathLike, uri: str, error=ManifestError
) -> None:
    """Refuse inputs that do not belong together: ``manifest`` must record ``upstream`` as its ``name``."""
    recorded = manifest.inputs.get(name, {}).get("manifest_sha256")
    actual = manifest_sha256(upstream)
    if recorded != actual:
        raise error(
            f"{what} was made from a {name} whose manifest is {str(recorded)[:12]}, "
            f"but --{name} {uri} has manifest {actual[:12]}; they do not belong together"
        )
