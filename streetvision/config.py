"""Typed, strict configuration: dataclass defaults, YAML files over them, ``key=value`` overrides on top.

Each step has its own config dataclass, so a step's config hash changes only when something that step
uses changes. Unknown keys and wrong types are errors that name the key. The resolved config is a plain
dict, saved beside the outputs and hashed into the manifest.
"""

from __future__ import annotations

import dataclasses
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
            path = Path(f)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist")
            loaded = OmegaConf.load(path)
            if loaded is None or not OmegaConf.is_dict(loaded):
                raise ConfigError(f"config file {path} must hold a mapping of sections")
            base = OmegaConf.merge(base, loaded)
        if overrides:
            # `key=` means the empty string (as a KFP launcher renders an empty parameter), not null.
            dotlist = [o + '""' if o.endswith("=") else o for o in overrides]
            base = OmegaConf.merge(base, OmegaConf.from_dotlist(dotlist))
        return OmegaConf.to_object(base)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {msg}" if key else f"config: {msg}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (what is saved and hashed)."""
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(config), sort_keys=False)
