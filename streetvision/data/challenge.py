"""The validator's challenge: the image a StreetVision (subnet 72) miner is asked about, made here.

Written from the parameters the subnet documents in its public validator code
(``natixnetwork/streetvision-subnet``; facts only, no code taken):

- ``natix/utils/image_transforms.py`` (``apply_augmentation_by_level``, ``get_base_transforms``,
  ``get_random_augmentations{,_medium,_hard}``, ``get_distortion_parameter``): one of four levels with
  probability 1/4 each. Level 0: centre crop to a square, resize to 224. Levels 1-3: rotation by a uniform
  angle in [-20, 20] degrees (bilinear, corners black), a random resized crop to 224 (area scale 0.2-1,
  aspect ratio 1), horizontal and vertical flips with probability 1/2 each. Level 2 adds colour
  saturation (CS), contrast (CC) and JPEG-downsampling (JPEG) distortions, each at a distortion level drawn
  from {0, 1}; level 3 adds CS, CC, JPEG, Gaussian noise in YCbCr (GNC) and Gaussian blur (GB), each at a
  level from {0, 1, 2}. The DeeperForensics parameters at distortion levels 1 and 2 are in
  :data:`DISTORTIONS`.
- ``natix/protocol.py`` (``prepare_image_synapse``): the result is sent as a JPEG at Pillow's default
  quality, 75; ``natix/validator/config.py``: ``TARGET_IMAGE_SIZE`` 224.

Numpy and Pillow only (no torch), seeded by a ``numpy.random.Generator``: a draw's parameters are a
:class:`Draw`, so a view can be reproduced and its level reported.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

SIZE = 224
JPEG_QUALITY = 75
LEVEL_PROBS = (0.25, 0.25, 0.25, 0.25)
MAX_ROTATION = 20.0  # degrees
CROP_SCALE = (0.2, 1.0)  # fraction of the (rotated) image's area
FLIP_P = 0.5
# Distortion -> its parameter at distortion levels 1 and 2 (level 0: not applied), in the order applied.
DISTORTIONS: dict[str, tuple[float, float]] = {
    "CS": (0.4, 0.3),  # chroma kept (saturation factor)
    "CC": (0.85, 0.725),  # contrast: every value multiplied
    "JPEG": (2, 3),  # downsampling factor, then back up
    "GNC": (0.001, 0.002),  # noise variance in YCbCr, values scaled to [0, 1]
    "GB": (7, 9),  # Gaussian kernel size (sigma = size / 6)
}
# Challenge level -> (the distortions it applies, the highest distortion level drawn for each).
LEVEL_DISTORTIONS: dict[int, tuple[tuple[str, ...], int]] = {
    2: (("CS", "CC", "JPEG"), 1),
    3: (("CS", "CC", "JPEG", "GNC", "GB"), 2),
}
# Enough pixels that the smallest crop (a side of sqrt(0.2) of the image) still holds 224 of them.
DECODE_SIDE = math.ceil(SIZE / math.sqrt(CROP_SCALE[0]))


@dataclass(frozen=True)
class Draw:
    """The parameters of one challenge view."""

    level: int
    angle: float = 0.0
    crop: tuple[int, int, int, int] | None = None  # (top, left, height, width) in the rotated image
    hflip: bool = False
    vflip: bool = False
    distortions: dict[str, int] = field(default_factory=dict)  # name -> distortion level (1 or 2)
    noise_seed: int = 0


def _crop_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """A random resized crop's box with aspect ratio 1, as torchvision draws it (10 tries, then centre)."""
    area = width * height
    for _ in range(10):
        side = int(round(math.sqrt(area * rng.uniform(*CROP_SCALE))))
        if 0 < side <= width and 0 < side <= height:
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            return top, left, side, side
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


def draw(rng: np.random.Generator, width: int, height: int, level: int | None = None) -> Draw:
    """The parameters of a view of a ``width`` x ``height`` image: a level as the validator draws it
    (or ``level``), and that level's random transforms."""
    if level is None:
        level = int(rng.choice(len(LEVEL_PROBS), p=LEVEL_PROBS))
    if level not in range(len(LEVEL_PROBS)):
        raise ValueError(f"challenge level must be 0..{len(LEVEL_PROBS) - 1}, not {level}")
    if level == 0:
        return Draw(0)
    angle = float(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    crop = _crop_box(rng, width, height)
    hflip, vflip = bool(rng.random() < FLIP_P), bool(rng.random() < FLIP_P)
    names, highest = LEVEL_DISTORTIONS.get(level, ((), 0))
    chosen = {name: int(rng.integers(0, highest + 1)) for name in names}
    return Draw(
        level,
        angle,
        crop,
        hflip,
        vflip,
        {k: v for k, v in chosen.items() if v},
        int(rng.integers(0, 2**63 - 1)),
    )


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=rgb.dtype)


def saturation(rgb: np.ndarray, keep: float) -> np.ndarray:
    """Scale the chroma (Cb, Cr) by ``keep`` around grey, luma unchanged."""
    x = rgb.astype(np.float32)
    y = _luma(x)[..., None]
    return np.clip(y + np.float32(keep) * (x - y), 0, 255).astype(np.uint8)


def contrast(rgb: np.ndarray, factor: float) -> np.ndarray:
    return (rgb.astype(np.float64) * factor).astype(np.uint8)  # truncation, as a uint8 cast does


def downsample(rgb: np.ndarray, factor: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    small = Image.fromarray(rgb).resize((max(1, w // factor), max(1, h // factor)), Image.BILINEAR)
    return np.asarray(small.resize((w, h), Image.BILINEAR))


def noise(rgb: np.ndarray, variance: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of ``variance`` added to Y, Cb and Cr on their [0, 1] video-range scales (219 and
    224 levels), converted back to RGB with the BT.601 coefficients. (Single precision: a training epoch
    draws one of these for every level-3 view.)"""
    sigma = math.sqrt(variance) * 255.0
    ny, ncb, ncr = rng.standard_normal((3, *rgb.shape[:2]), dtype=np.float32)
    ny *= np.float32(sigma * 255 / 219)
    ncb *= np.float32(sigma * 255 / 224)
    ncr *= np.float32(sigma * 255 / 224)
    delta = np.stack([ny + 1.403 * ncr, ny - 0.714 * ncr - 0.344 * ncb, ny + 1.773 * ncb], axis=-1)
    return np.clip(rgb.astype(np.float32) + delta, 0, 255).astype(np.uint8)


def gaussian_kernel(size: int) -> np.ndarray:
    sigma = size / 6.0
    x = np.arange(size) - (size - 1) / 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def blur(rgb: np.ndarray, size: int) -> np.ndarray:
    """Separable Gaussian blur with a ``size`` kernel, sigma ``size / 6``, mirrored borders (single
    precision, accumulated in place)."""
    k, r = gaussian_kernel(size).astype(np.float32), size // 2
    h, w = rgb.shape[:2]
    x = np.pad(rgb, ((r, r), (r, r), (0, 0)), mode="reflect").astype(np.float32)
    rows = x[:h] * k[0]
    for i in range(1, size):
        rows += x[i : i + h] * k[i]
    out = rows[:, :w] * k[0]
    for i in range(1, size):
        out += rows[:, i : i + w] * k[i]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def apply(image: Image.Image, d: Draw) -> Image.Image:
    """The 224 x 224 RGB view ``d`` describes (before the JPEG encoding)."""
    image = image.convert("RGB")
    if d.level == 0:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.BILINEAR)
    rotated = image.rotate(d.angle, resample=Image.BILINEAR, expand=False, fillcolor=(0, 0, 0))
    top, left, h, w = d.crop  # type: ignore[misc]
    view = rotated.crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BILINEAR)
    if d.hflip:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    if d.vflip:
        view = view.transpose(Image.FLIP_TOP_BOTTOM)
    rgb = np.asarray(view)
    rng = np.random.default_rng(d.noise_seed)
    for name in DISTORTIONS:  # in the validator's order
        if name not in d.distortions:
            continue
        param = DISTORTIONS[name][d.distortions[name] - 1]
        if name == "CS":
            rgb = saturation(rgb, param)
        elif name == "CC":
            rgb = contrast(rgb, param)
        elif name == "JPEG":
            rgb = downsample(rgb, int(param))
        elif name == "GNC":
            rgb = noise(rgb, param, rng)
        else:
            rgb = blur(rgb, int(param))
    return Image.fromarray(rgb)


def encode(image: Image.Image) -> bytes:
    """The bytes the validator sends: a JPEG at quality 75."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def challenge(
    image: Image.Image, rng: np.random.Generator, level: int | None = None
) -> tuple[Image.Image, Draw]:
    """(the decoded JPEG a miner receives, its parameters) for ``image``."""
    d = draw(rng, image.width, image.height, level)
    with Image.open(io.BytesIO(encode(apply(image, d)))) as sent:
        return sent.convert("RGB"), d
