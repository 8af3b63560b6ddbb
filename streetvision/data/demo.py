"""Deterministic demo data: street-like scenes, with roadwork cues in positives and look-alikes in negatives.

Positives carry cones, striped barriers or a roadwork sign on the road; negatives carry distractors that
share a colour or a shape with them (orange cars, zebra crossings, other warning signs), and both vary in
light, noise and clutter. Same seed, same bytes: the embedded default dataset of ``make run``.
``domain="shifted"`` draws the same kind of scenes in another domain (colour channels rotated, objects
larger, a striped texture over everything): what adapt_explora's benchmark pre-trains on, away from the target.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from streetvision.data.dataset import INDEX, DataError
from streetvision.io import atomic, store

ORANGE = (245, 120, 20)
DOMAINS = ("street", "shifted")


def _c(rng: np.random.Generator, base: tuple[int, int, int], jitter: int = 20) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-jitter, jitter + 1), 0, 255)) for v in base)  # type: ignore[return-value]


def _point(rng: np.random.Generator, s: int, horizon: int) -> tuple[int, int, float]:
    """A point on the road, with a perspective scale (things near the bottom are bigger)."""
    y = int(rng.uniform(horizon + 0.15 * (s - horizon), s * 0.95))
    depth = (y - horizon) / (s - horizon)
    half = 0.08 * s + depth * 0.55 * s
    x = int(rng.uniform(s / 2 - half * 0.9, s / 2 + half * 0.9))
    return x, y, 0.4 + depth


def _background(d: ImageDraw.ImageDraw, rng: np.random.Generator, s: int) -> int:
    horizon = int(s * rng.uniform(0.35, 0.5))
    sky = _c(rng, (135, 175, 215), 35)
    for y in range(horizon):
        t = y / max(horizon, 1)
        d.line([(0, y), (s, y)], fill=tuple(int(v * (0.8 + 0.2 * t)) for v in sky))
    x = 0
    while x < s:  # buildings along the horizon
        w, h = int(rng.uniform(0.1, 0.25) * s), int(rng.uniform(0.1, 0.35) * s)
        d.rectangle([x, horizon - h, x + w, horizon], fill=_c(rng, (150, 140, 130), 50))
        for wy in range(horizon - h + 3, horizon - 3, max(3, s // 24)):
            for wx in range(x + 2, x + w - 2, max(3, s // 24)):
                d.rectangle([wx, wy, wx + 1, wy + 1], fill=_c(rng, (60, 70, 90), 30))
        x += w
    d.rectangle([0, horizon, s, s], fill=_c(rng, (110, 150, 90), 25))  # verge
    d.polygon(
        [(s * 0.42, horizon), (s * 0.58, horizon), (s * 1.1, s), (-s * 0.1, s)],
        fill=_c(rng, (95, 95, 98), 18),
    )
    for k in range(6):  # lane dashes
        y0 = horizon + (s - horizon) * k / 6
        y1 = y0 + (s - horizon) / 12
        d.line(
            [(s / 2, y0), (s / 2, y1)], fill=_c(rng, (230, 230, 210), 15), width=max(1, int(1 + 3 * k / 6))
        )
    return horizon


def _cone(d, rng, x, y, k, s):
    h, w = 0.16 * s * k, 0.07 * s * k
    d.polygon([(x, y - h), (x - w / 2, y), (x + w / 2, y)], fill=_c(rng, ORANGE, 15))
    d.rectangle([x - w / 3, y - h * 0.55, x + w / 3, y - h * 0.4], fill=(245, 245, 245))
    d.rectangle([x - w * 0.7, y - 1, x + w * 0.7, y + max(1, h * 0.06)], fill=(40, 40, 40))


def _barrier(d, rng, x, y, k, s):
    w, h = 0.3 * s * k, 0.06 * s * k
    colour = (220, 30, 30) if rng.random() < 0.5 else ORANGE
    d.rectangle([x - w / 2, y - h * 2.2, x + w / 2, y - h * 1.2], fill=(245, 245, 245))
    stripes = 5
    for i in range(stripes):
        x0 = x - w / 2 + i * w / stripes
        d.polygon(
            [
                (x0, y - h * 1.2),
                (x0 + w / (2 * stripes), y - h * 1.2),
                (x0 + w / stripes, y - h * 2.2),
                (x0 + w / (2 * stripes), y - h * 2.2),
            ],
            fill=colour,
        )
    for lx in (x - w * 0.4, x + w * 0.4):
        d.line([(lx, y - h * 1.2), (lx, y)], fill=(60, 60, 60), width=max(1, int(2 * k)))


def _sign(d, rng, x, y, k, s, kind):
    r = 0.07 * s * k
    pole_top = y - 0.22 * s * k
    d.line([(x, pole_top), (x, y)], fill=(120, 120, 120), width=max(1, int(2 * k)))
    cx, cy = x, pole_top - r
    if kind == "roadwork":  # red-bordered triangle with a dark worker figure
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=(220, 20, 20))
        d.polygon(
            [(cx, cy - r * 0.55), (cx - r * 0.6, cy + r * 0.55), (cx + r * 0.6, cy + r * 0.55)],
            fill=(250, 250, 250),
        )
        d.ellipse([cx - r * 0.2, cy - r * 0.1, cx + r * 0.2, cy + r * 0.4], fill=(20, 20, 20))
    elif kind == "diamond":  # yellow warning diamond (not roadwork)
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=(240, 200, 20))
        d.line([(cx - r * 0.4, cy), (cx + r * 0.4, cy)], fill=(20, 20, 20), width=max(1, int(k)))
    elif kind == "round":  # blue mandatory sign
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(30, 80, 200))
        d.line([(cx - r * 0.5, cy), (cx + r * 0.5, cy)], fill=(250, 250, 250), width=max(1, int(2 * k)))
    else:  # red octagon-ish stop sign
        d.regular_polygon((cx, cy, r), 8, fill=(200, 20, 20))


def _orange_car(d, rng, x, y, k, s):
    w, h = 0.3 * s * k, 0.12 * s * k
    d.rounded_rectangle([x - w / 2, y - h, x + w / 2, y], radius=max(1, int(h / 4)), fill=_c(rng, ORANGE, 20))
    d.rectangle([x - w / 3, y - h * 1.45, x + w / 3, y - h * 0.95], fill=_c(rng, ORANGE, 20))
    d.rectangle([x - w / 4, y - h * 1.35, x + w / 4, y - h], fill=(50, 60, 80))
    for wx in (x - w / 3, x + w / 3):
        d.ellipse([wx - h / 3, y - h / 3, wx + h / 3, y + h / 3], fill=(20, 20, 20))


def _zebra(d, rng, horizon, s):
    y = rng.uniform(horizon + 0.4 * (s - horizon), s * 0.9)
    depth = (y - horizon) / (s - horizon)
    half = 0.08 * s + depth * 0.55 * s
    for i in range(7):
        x0 = s / 2 - half + i * 2 * half / 7
        d.rectangle([x0, y, x0 + half / 7, y + 0.04 * s * (0.4 + depth)], fill=(235, 235, 235))


def _scene(rng: np.random.Generator, s: int, positive: bool, domain: str = "street") -> Image.Image:
    img = Image.new("RGB", (s, s))
    d = ImageDraw.Draw(img)
    horizon = _background(d, rng, s)
    grow = 1.6 if domain == "shifted" else 1.0

    def _road_point(rng, s, horizon):  # objects drawn larger in the shifted domain
        x, y, k = _point(rng, s, horizon)
        return x, y, k * grow

    for _ in range(int(rng.integers(0, 6))):  # clutter: trees and poles at the roadside
        x = rng.uniform(0, s)
        y = rng.uniform(horizon, horizon + 0.2 * s)
        r = rng.uniform(0.02, 0.06) * s
        d.ellipse([x - r, y - 2 * r, x + r, y], fill=_c(rng, (50, 110, 50), 30))
    if positive:
        cues = rng.choice(["cones", "barrier", "sign"], size=int(rng.integers(1, 3)), replace=False)
        for cue in cues:
            if cue == "cones":
                for _ in range(int(rng.integers(2, 6))):
                    _cone(d, rng, *_road_point(rng, s, horizon), s)
            elif cue == "barrier":
                _barrier(d, rng, *_road_point(rng, s, horizon), s)
            else:
                _sign(d, rng, *_road_point(rng, s, horizon), s, "roadwork")
    distractors = int(rng.integers(0, 2) if positive else rng.integers(1, 3))
    for kind in rng.choice(["car", "zebra", "diamond", "round", "stop"], size=distractors, replace=False):
        if kind == "car":
            _orange_car(d, rng, *_road_point(rng, s, horizon), s)
        elif kind == "zebra":
            _zebra(d, rng, horizon, s)
        else:
            _sign(d, rng, *_road_point(rng, s, horizon), s, kind)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.9)))
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.55, 1.3)  # light
    if domain == "shifted":
        arr = arr[..., [2, 0, 1]]  # other colours
        stripes = np.sin(np.add.outer(np.arange(s), np.arange(s)) * rng.uniform(0.6, 1.2)) * 30
        arr = arr + stripes[..., None]  # another texture
    arr += rng.normal(0, rng.uniform(0, 12), arr.shape)  # sensor noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def write_demo_dataset(
    out: str | Path, *, n: int = 240, seed: int = 0, size: int = 96, domain: str = "street"
) -> Path:
    """Write ``n`` JPEGs under ``out/images`` and ``out/labels.csv`` (half positives), deterministically."""
    check_demo(n, seed, size)
    if domain not in DOMAINS:
        raise DataError(f"demo domain {domain!r}: one of {', '.join(DOMAINS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file, not a folder")
    for left in out.glob("**/.*.tmp"):  # what a killed generation left
        left.unlink()
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 2)
    rows = ["image,label"]
    for i, label in enumerate(labels.tolist()):
        img = _scene(np.random.default_rng([seed, i]), size, bool(label), domain)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        name = f"images/{i:05d}.jpg"
        atomic.write_bytes(out / name, buf.getvalue())
        rows.append(f"{name},{label}")
    atomic.write_text(out / INDEX, "\n".join(rows) + "\n")  # the index last: it is what makes a dataset
    return out


MAX_DEMO_IMAGES = 1_000_000


def check_demo(n: int, seed: int, size: int, prefix: str = "--") -> None:
    """The demo settings' ranges; ``prefix`` names them as the user typed them (``--n`` or ``demo.n``)."""
    if not 8 <= n <= MAX_DEMO_IMAGES:
        raise DataError(
            f"{prefix}n={n}: the demo dataset holds 8 to {MAX_DEMO_IMAGES:,} images (each split needs both "
            "classes; a bigger one is no demo)"
        )
    if not 0 <= seed < 2**32:
        raise DataError(f"{prefix}seed={seed}: must be an integer in [0, 2^32)")
    if not 16 <= size <= 4096:
        raise DataError(f"{prefix}size={size}: the image side must be 16..4096 pixels")


def write_demo(uri: str, *, n: int = 240, seed: int = 0, size: int = 96, domain: str = "street") -> str:
    """The demo dataset at a folder or ``s3://`` prefix (generated locally, then uploaded index last)."""
    if not store.is_s3(uri):
        return str(write_demo_dataset(uri, n=n, seed=seed, size=size, domain=domain))
    check_demo(n, seed, size)
    with tempfile.TemporaryDirectory(prefix="sv-demo-") as tmp:
        write_demo_dataset(tmp, n=n, seed=seed, size=size, domain=domain)
        store.upload_tree(tmp, uri, exclude={INDEX})
        store.upload_file(Path(tmp, INDEX), store.join(uri, INDEX))
    return uri
