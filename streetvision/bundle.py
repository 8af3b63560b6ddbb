"""The exported bundle: ``bundle.json`` plus the files it names, all by relative paths with checksums.

:func:`verify_bundle` is what every loader calls first: schema, every checksum and size, and no path that
is absolute, has a ``..`` component, or is a symlink leading outside the bundle.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from streetvision.config import read_json
from streetvision.errors import StreetVisionError
from streetvision.eval.sweep import sigmoid
from streetvision.io.atomic import compute_file_sha256
from streetvision.io.manifests import verify_dir
from streetvision.io.paths import PathEscape, inside

BUNDLE_FILE = "bundle.json"
BUNDLE_SCHEMA = 1
ARCH_KEYS = {"img_size"}  # what a bundle may pass to timm.create_model besides the name
POLICY_TYPES = ("threshold", "scrc")
# What each policy type carries into bundle.json (and must equal in its policy file).
POLICY_PARAMS = {
    "threshold": ("threshold",),
    "scrc": ("threshold", "temperature", "lambda", "alpha", "delta", "risk", "confidence"),
}
GATE_FILES = {"weights": "gate.safetensors", "config": "gate.json"}  # what a gate policy bundles
REQUIRED = (
    "schema_version",
    "files",
    "model",
    "policy",
    "splits",
    "backbone",
    "num_classes",
    "class_names",
    "preprocessing",
    "created_at",
    "code_version",
)
KNOWN = frozenset({*REQUIRED, "decode_min_side", "test_metrics", "held_out", "lineage"})


class BundleError(StreetVisionError):
    """A bundle is malformed, tampered with, or names a path outside itself."""


def policy_outputs(kind: str, params: dict[str, Any], scores, gate=None) -> dict[str, Any]:
    """What a policy makes of raw P(roadwork) scores (numpy arrays): the probability it decides on
    (temperature-calibrated for ``scrc``), the decision (1 roadwork, 0 not), whether it answers (``scrc``
    defers where its confidence, the margin or the ``gate`` scores of the same images, is below lambda)
    and the served probability (decision threshold at 0.5)."""
    p = np.asarray(scores, dtype=np.float64)
    if kind not in POLICY_TYPES:
        raise BundleError(f"policy type {kind!r} cannot be applied")
    t = float(params["threshold"])
    if kind == "scrc":
        logit = np.log(np.clip(p, 1e-300, None)) - np.log(np.clip(1 - p, 1e-300, None))
        p = sigmoid(logit / float(params["temperature"]))
    served = served_probability(p, t)
    decision = (p >= t).astype(np.int64)
    answered = np.ones(p.shape, dtype=bool)
    if kind == "scrc":
        if params["confidence"] == "gate":
            if gate is None or np.shape(gate) != p.shape:
                raise BundleError("this policy answers by its gate's scores, and they were not given")
            confidence = np.asarray(gate, dtype=np.float64)
        else:
            confidence = np.abs(2 * served - 1)
        answered = confidence >= float(params["lambda"])
    return {"probability": p, "decision": decision, "answered": answered, "served": served}


SERVED_MARGIN = 1e-6  # how far above 0.5 the threshold itself is served


def served_probability(p, threshold: float):
    """Monotone piecewise-linear remap of P(roadwork) for consumers that cut at 0.5 with ``np.round``
    (the StreetVision subnet validator), which reads exactly 0.5 as "no roadwork".

    Scores at or above ``threshold`` map into [0.5 + 1e-6, 1] (the threshold itself to 0.500001), scores
    below it into [0, 0.5), so the served answer decides exactly as the policy does. A float in, a float
    out; an array in, an array out.
    """
    p = np.asarray(p, dtype=np.float64)
    t = float(threshold)
    lo, hi = 0.5 - 0.5 * SERVED_MARGIN, 0.5 + SERVED_MARGIN
    below = lo * p / t if t > 0 else np.zeros_like(p)
    above = hi + (1 - hi) * (p - t) / (1 - t) if t < 1 else np.ones_like(p)
    out = np.clip(np.where(p >= t, above, below), 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


def safe_member(root: Path, name: str) -> Path:
    """Resolve ``name`` inside ``root``; refuse absolute paths, ``..`` and links that lead out."""
    try:
        return inside(root, name)
    except PathEscape as e:
        raise BundleError(
            f"{root}: {e} in {BUNDLE_FILE}; bundles use relative paths inside the bundle"
        ) from None


def referenced_paths(bundle: dict[str, Any]) -> list[str]:
    """Every path the bundle names, wherever it names it."""
    gate = bundle["policy"].get("gate")
    return [
        bundle["model"]["weights"],
        bundle["model"]["config"],
        bundle["policy"]["file"],
        bundle["splits"],
        *(gate[k] for k in GATE_FILES if gate),
    ]


def check_threshold(value: Any, where: str) -> float:
    """A threshold policy's threshold: a number in [0, 1]."""
    if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1):
        raise BundleError(f"{where}: threshold must be a number in [0, 1], not {value!r}")
    return float(value)


def check_policy_params(kind: str, params: dict[str, Any], where: str) -> None:
    """A policy's parameters: a threshold in [0, 1]; for ``scrc`` also a positive temperature, a
    confidence threshold lambda in [0, 1], alpha in (0, 1), delta null or in (0, 1), a known risk."""
    if set(params) != set(POLICY_PARAMS[kind]):
        raise BundleError(f"{where}: a {kind} policy carries exactly {', '.join(POLICY_PARAMS[kind])}")
    check_threshold(params.get("threshold"), where)
    if kind != "scrc":
        return

    def number(key: str, ok) -> None:
        v = params.get(key)
        if not (isinstance(v, int | float) and not isinstance(v, bool) and ok(v)):
            raise BundleError(f"{where}: {key} is {v!r}, out of range")

    number("temperature", lambda v: 0 < v < 1e6)
    number("lambda", lambda v: 0 <= v <= 1)
    number("alpha", lambda v: 0 < v < 1)
    if params.get("delta") is not None:
        number("delta", lambda v: 0 < v < 1)
    if params.get("risk") not in ("error", "fnr"):
        raise BundleError(f"{where}: risk is {params.get('risk')!r}, not error or fnr")
    if params.get("confidence") not in ("margin", "gate"):
        raise BundleError(f"{where}: confidence is {params.get('confidence')!r}, not margin or gate")


GATE_INFO = {"num_features": int, "hidden": int, "dropout": float, "threshold": float}


def read_gate_info(path: Path) -> dict[str, Any]:
    """A gate's description (train_gate's ``model.json``, a bundle's ``gate.json``), checked for shape."""
    info = read_json(path, BundleError)
    for key, kind in GATE_INFO.items():
        value = info.get(key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and (type(value) is int and value >= 1 if kind is int else np.isfinite(value))):
            raise BundleError(f"{path}: {key} must be {'a positive integer' if kind is int else 'a number'}")
    if not (0 <= info["dropout"] < 1 and 0 <= info["threshold"] <= 1):
        raise BundleError(f"{path}: dropout must be in [0, 1) and threshold in [0, 1]")
    return info


def _shape(bundle: Any, where: str) -> dict[str, Any]:
    if not isinstance(bundle, dict):
        raise BundleError(f"{where}: not a JSON object")
    missing = [k for k in REQUIRED if k not in bundle]
    if missing:
        raise BundleError(f"{where}: missing field(s) {', '.join(missing)}")
    if unknown := sorted(set(bundle) - KNOWN):
        raise BundleError(f"{where}: unknown field(s) {', '.join(map(str, unknown[:5]))}")
    if bundle["schema_version"] != BUNDLE_SCHEMA:
        raise BundleError(f"{where}: unsupported schema_version {bundle['schema_version']!r}")
    files, model, policy = bundle["files"], bundle["model"], bundle["policy"]
    if not (isinstance(files, dict) and all(isinstance(m, dict) for m in files.values())):
        raise BundleError(f"{where}: 'files' must map names to {{sha256, size}}")
    if not (isinstance(model, dict) and isinstance(policy, dict) and isinstance(policy.get("params"), dict)):
        raise BundleError(f"{where}: 'model' and 'policy' (with 'params') must be JSON objects")
    arch = model.get("architecture")
    if not (
        isinstance(arch, dict) and set(arch) <= ARCH_KEYS and all(_int(v, 1, MAX_SIDE) for v in arch.values())
    ):
        raise BundleError(
            f"{where}: model.architecture may only set {', '.join(sorted(ARCH_KEYS))} (integers 1 to {MAX_SIDE})"
        )
    check_preprocessing(bundle["preprocessing"], f"{where}: preprocessing")
    if policy.get("type") not in POLICY_TYPES:
        raise BundleError(f"{where}: unknown policy type {policy.get('type')!r}")
    check_policy_params(policy["type"], policy["params"], f"{where}: policy")
    gated = policy["params"].get("confidence") == "gate"
    gate = policy.get("gate")
    if gated != (gate is not None) or (
        gated and not (isinstance(gate, dict) and set(gate) == set(GATE_FILES))
    ):
        raise BundleError(
            f"{where}: policy.gate ({', '.join(GATE_FILES)}) is present exactly when confidence is gate"
        )
    names = bundle["class_names"]
    if not (isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        raise BundleError(f"{where}: class_names must be two names")
    return bundle


MAX_SIDE = 4096  # the largest input side (and architecture value) a bundle may ask for


def _int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _numbers(value: Any, n: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(type(v) in (int, float) and math.isfinite(v) for v in value)
    )


def check_preprocessing(prep: Any, where: str) -> None:
    """What the serving transform is built from: an RGB input of a sane size, three finite means and
    positive standard deviations, a crop fraction in (0, 1]."""
    ok = (
        isinstance(prep, dict)
        and isinstance(size := prep.get("input_size"), list)
        and len(size) == 3
        and size[0] == 3
        and all(_int(v, 1, MAX_SIDE) for v in size[1:])
        and _numbers(prep.get("mean"), 3)
        and _numbers(std := prep.get("std"), 3)
        and all(v > 0 for v in std)
        and type(prep.get("crop_pct")) in (int, float)
        and 0 < prep["crop_pct"] <= 1
        and isinstance(prep.get("interpolation"), str)
    )
    if not ok:
        raise BundleError(
            f"{where} must have input_size [3, H, W] (1 to {MAX_SIDE} px), three finite mean and positive std "
            "values, crop_pct in (0, 1] and an interpolation"
        )


def load_bundle_json(root: str | Path) -> dict[str, Any]:
    """``bundle.json`` of a bundle whose manifest has just been verified, checked for shape."""
    path = Path(root) / BUNDLE_FILE
    if not path.is_file():
        raise BundleError(f"{root}: no {BUNDLE_FILE}; not a StreetVision bundle")
    return _shape(read_json(path, BundleError), str(path))


def verify_bundle(root: str | Path) -> dict[str, Any]:
    """Return ``bundle.json`` of an intact bundle, or raise naming the first offending entry.

    The bundle is a committed ``export_bundle`` step: its manifest is verified first (every file,
    ``bundle.json`` included, and nothing else), then the bundle's own paths and checksums, and the
    policy it applies is the one in the policy file it names.
    """
    verify_dir(root, "export_bundle")
    return check_bundle(root)


def check_bundle(root: str | Path) -> dict[str, Any]:
    """The bundle-level checks of :func:`verify_bundle` (its paths, checksums and policy), which the
    exporter also runs on its staging folder before it commits."""
    root = Path(root)
    bundle = load_bundle_json(root)
    files = bundle["files"]
    for name in referenced_paths(bundle):
        if name not in files:
            raise BundleError(f"{root}: {name!r} is used but has no checksum in {BUNDLE_FILE}")
    for name, meta in files.items():
        target = safe_member(root, name)
        if not target.is_file():
            raise BundleError(f"{root}: {name}: missing")
        if target.stat().st_size != meta.get("size"):
            raise BundleError(
                f"{root}: {name}: size {target.stat().st_size} != {meta.get('size')} in {BUNDLE_FILE}"
            )
        if compute_file_sha256(target) != meta.get("sha256"):
            raise BundleError(f"{root}: {name}: sha256 differs from {BUNDLE_FILE}")
    if gate := bundle["policy"].get("gate"):
        read_gate_info(root / gate["config"])
    policy_file = read_json(root / bundle["policy"]["file"], BundleError)
    for key, value in bundle["policy"]["params"].items():
        if policy_file.get(key) != value:
            raise BundleError(
                f"{root}: the {key} in {BUNDLE_FILE} differs from the one in {bundle['policy']['file']}"
            )
    return bundle
