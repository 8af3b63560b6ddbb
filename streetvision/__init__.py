"""StreetVision: crash-safe training, calibration and export of a roadwork street-scene classifier."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("streetvision")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
