"""Typed, strict configuration: dataclass defaults, YAML files over them, ``key=value`` overrides on top.

Each step has its own config dataclass, so a step's config hash changes only when something that step
uses changes. Unknown keys and wrong types are errors that name the key. The resolved config is a plain
dict, saved beside the outputs and hashed into the manifest.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from streetvision.errors import StreetVisionError

T = TypeVar("T")


class ConfigError(StreetVisionError, ValueError):
    """A config file or override is wrong; the message names the key."""


def load_config(cls: type[T], files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from its defaults, then each YAML file, then ``key=value`` overrides."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    base = OmegaConf.structured(cls)
    OmegaConf.set_struct(base, True)
    for bad in (o for o in overrides if "=" not in o):
        raise ConfigError(f"override {bad!r} is not of the form key=value (e.g. model.lr=0.001)")
    try:
        for f in files:
            base = OmegaConf.merge(base, read_yaml(f))
        for override in overrides:
            base = _merge_override(base, override)
        config = OmegaConf.to_object(base)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {msg}" if key else f"config: {msg}") from None
    if hasattr(config, "check"):
        config.check()  # every value's range, before any work
    return config  # type: ignore[return-value]


_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _merge_override(base, override: str):
    """Merge one ``key=value``; an error names that key even where OmegaConf's message does not."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    key, _, value = override.partition("=")
    if (
        isinstance(OmegaConf.select(base, key, default=None), bool)
        and value.strip().lower() not in _BOOL_WORDS
    ):
        raise ConfigError(f"config key {key!r}: {value!r} is not a boolean (true or false)")
    # `key=` means the empty string (as a KFP launcher renders an empty parameter), not null.
    try:
        return OmegaConf.merge(base, OmegaConf.from_dotlist([override + '""' if not value else override]))
    except (OmegaConfBaseException, yaml.YAMLError, TypeError, ValueError) as e:
        # also a value YAML cannot read ([0.25,0.25) or a mapping where a list or number belongs ({a:1})
        what = str(e).splitlines()[0] if not isinstance(e, TypeError) else f"{value!r} has the wrong shape"
        raise ConfigError(f"config key {key!r}: {what}") from None


def read_yaml(f: str | Path):
    """A config file as an OmegaConf mapping, or one line saying why it cannot be one."""
    import yaml
    from omegaconf import OmegaConf

    if str(f).startswith("s3://"):
        raise ConfigError(f"--config {f}: config files are read from local paths, not s3://")
    path = Path(f)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except (
        yaml.YAMLError,
        UnicodeDecodeError,
        ValueError,
        RecursionError,
    ) as e:  # ValueError: a 5,000-digit int
        raise ConfigError(f"config file {path}: not valid YAML ({str(e).splitlines()[0][:200]})") from None
    if loaded is None or not OmegaConf.is_dict(loaded):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return loaded


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """Raise naming ``key`` unless ``ok``; write ``ok`` so that NaN fails it (``0 < x``, not ``not x <= 0``)."""
    if not ok:
        raise ConfigError(f"config key {key!r}: {value!r} is out of range; {rule}")


def probability(key: str, value: float | None) -> None:
    """An optional rate or probability: None, or a number in [0, 1]."""
    require(value is None or 0 <= value <= 1, key, value, "a number in [0, 1], or null for none")


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (what is saved and hashed)."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def strict_json(text: str) -> Any:
    """Parse a JSON document as the standard says: NaN and Infinity are refused, and so is nesting deeper
    than Python's stack (a ``ValueError`` saying so, never a ``RecursionError``)."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path: Path, error: type[Exception] = ConfigError, kind: type = dict) -> Any:
    """A JSON object (or ``kind``: list) from ``path``, or ``error`` with one line naming the file."""
    try:
        data = strict_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise error(f"{path}: not a readable JSON document ({e})") from None
    if not isinstance(data, kind):
        raise error(f"{path}: must hold a JSON {'object' if kind is dict else 'list'}")
    return data
