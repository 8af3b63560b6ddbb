"""A StreetVision subnet (72) miner's detector backed by a verified bundle.

The subnet's miner builds its image detector as ``DETECTOR_REGISTRY[name](config_name=..., device=...)``
and answers each challenge with ``detector(PIL.Image)``, a float in [0, 1] that the validator cuts with
``np.round`` (``base_miner/detectors/feature_detector.py``, ``neurons/miner.py`` in
``natixnetwork/streetvision-subnet``). :class:`StreetVisionDetector` has that shape and depends only on
this package: register it in the miner's ``base_miner/detectors/__init__.py`` with

    from streetvision.miner import StreetVisionDetector
    DETECTOR_REGISTRY.register_module(module_name="StreetVision")(StreetVisionDetector)

and set ``IMAGE_DETECTOR=StreetVision`` and ``IMAGE_DETECTOR_CONFIG=/path/streetvision.yaml`` (a YAML file
with ``bundle: <bundle folder or s3:// prefix>``) in ``miner.env``; ``IMAGE_DETECTOR_DEVICE`` is the device.
Without a config file the bundle comes from ``$STREETVISION_BUNDLE``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from streetvision.errors import StreetVisionError

BUNDLE_ENV = "STREETVISION_BUNDLE"


def bundle_location(config_name: str | None) -> str:
    """The bundle a detector serves: ``bundle:`` in the YAML ``config_name``, else ``$STREETVISION_BUNDLE``."""
    if config_name:
        import yaml

        path = Path(config_name)
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise StreetVisionError(f"detector config {path}: cannot be read ({e})") from None
        if not (isinstance(config, dict) and isinstance(config.get("bundle"), str) and config["bundle"]):
            raise StreetVisionError(
                f"detector config {path}: needs 'bundle: <bundle folder or s3:// prefix>'"
            )
        return config["bundle"]
    if not os.environ.get(BUNDLE_ENV):
        raise StreetVisionError(f"no detector config and no ${BUNDLE_ENV}: say which bundle to serve")
    return os.environ[BUNDLE_ENV]


class StreetVisionDetector:
    """``load_model()`` verifies and loads the bundle once; ``detector(image)`` is the served probability."""

    def __init__(self, model_name: str = "StreetVision", config_name: str | None = None, device: str = "cpu"):
        self.model_name, self.device = model_name, str(device)
        self.bundle = bundle_location(config_name)
        self.load_model()

    def load_model(self) -> None:
        from streetvision.predict import Predictor

        self.predictor = Predictor.from_bundle(self.bundle, device=self.device)

    def __call__(self, image: Any) -> float:
        return self.predictor(image)
