"""The challenge transform against the validator's documented parameters (streetvision.data.challenge)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from streetvision.data import challenge as ch

N = 4000


def _sigma(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def draws():
    rng = np.random.default_rng(0)
    return [ch.draw(rng, 500, 500) for _ in range(N)]


def test_levels_are_drawn_with_probability_one_quarter(draws):
    counts = np.bincount([d.level for d in draws], minlength=4) / N
    assert np.all(np.abs(counts - 0.25) < 4 * _sigma(0.25, N)), counts


def test_geometry_follows_the_documented_ranges(draws):
    moved = [d for d in draws if d.level > 0]
    angles = np.array([d.angle for d in moved])
    assert angles.min() >= -20 and angles.max() <= 20
    assert abs(angles.mean()) < 4 * 40 / math.sqrt(12 * len(angles))
    assert abs(angles.var() - 40**2 / 12) < 0.1 * 40**2 / 12  # uniform on [-20, 20]
    scales = np.array([d.crop[2] * d.crop[3] / 500**2 for d in moved])
    assert all(d.crop[2] == d.crop[3] for d in moved)  # aspect ratio 1
    assert scales.min() >= 0.2 - 0.01 and scales.max() <= 1.0
    assert abs(scales.mean() - 0.6) < 0.02  # uniform on [0.2, 1] for a square image
    for flip in ("hflip", "vflip"):
        rate = np.mean([getattr(d, flip) for d in moved])
        assert abs(rate - 0.5) < 4 * _sigma(0.5, len(moved)), (flip, rate)
    assert all(d.crop is None and not d.distortions for d in draws if d.level == 0)


@pytest.mark.parametrize(("level", "names", "highest"), [(1, (), 0), (2, ("CS", "CC", "JPEG"), 1),
                                                         (3, ("CS", "CC", "JPEG", "GNC", "GB"), 2)])  # fmt: skip
def test_distortion_levels_are_uniform_per_challenge_level(draws, level, names, highest):
    at = [d for d in draws if d.level == level]
    assert set().union(*(d.distortions for d in at)) <= set(names)
    for name in names:
        counts = np.bincount([d.distortions.get(name, 0) for d in at], minlength=highest + 1)
        p = 1 / (highest + 1)
        assert len(counts) == highest + 1
        assert np.all(np.abs(counts / len(at) - p) < 4 * _sigma(p, len(at))), (name, counts)


def test_documented_parameters():
    assert ch.DISTORTIONS == {
        "CS": (0.4, 0.3),
        "CC": (0.85, 0.725),
        "JPEG": (2, 3),
        "GNC": (0.001, 0.002),
        "GB": (7, 9),
    }
    assert ch.SIZE == 224 and ch.JPEG_QUALITY == 75 and ch.LEVEL_PROBS == (0.25,) * 4


def _photo(w=640, h=480, seed=0):
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3)) * [1.0, 0.5, 0.2]
    return Image.fromarray(np.clip(x + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_a_view_is_a_224_jpeg_at_quality_75(level):
    sent = ch.encode(ch.apply(_photo(), ch.draw(np.random.default_rng(level), 640, 480, level)))
    with Image.open(io.BytesIO(sent)) as im:
        assert im.format == "JPEG" and im.size == (224, 224)
        reference = Image.open(io.BytesIO(ch.encode(Image.new("RGB", (8, 8))))).quantization
        assert im.quantization == reference
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format="JPEG", quality=90)
        assert Image.open(buf).quantization != reference  # the comparison can tell qualities apart


def test_level_0_is_a_centre_crop():
    im = Image.new("RGB", (300, 200), (0, 0, 0))
    im.paste((255, 255, 255), (50, 0, 250, 200))  # the centred square is white, the sides black
    view = np.asarray(ch.apply(im, ch.Draw(0)))
    assert view.shape == (224, 224, 3) and view.min() == 255


def test_same_seed_same_view_and_seeds_differ():
    a, da = ch.challenge(_photo(), np.random.default_rng(5), level=3)
    b, db = ch.challenge(_photo(), np.random.default_rng(5), level=3)
    c, _ = ch.challenge(_photo(), np.random.default_rng(6), level=3)
    assert da == db and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_each_distortion_does_what_its_parameter_says():
    flat = np.full((64, 64, 3), 200, np.uint8)
    assert ch.contrast(flat, 0.85).max() == 170 and ch.contrast(flat, 0.725).max() == 145
    coloured = np.zeros((8, 8, 3), np.uint8) + np.array([200, 100, 50], np.uint8)
    y = coloured[0, 0] @ [0.299, 0.587, 0.114]
    chroma = np.abs(ch.saturation(coloured, 0.4)[0, 0].astype(float) - y)
    assert np.allclose(chroma, 0.4 * np.abs(coloured[0, 0] - y), atol=1.0)
    grey = np.full((256, 256, 3), 128, np.uint8)
    noisy = ch.noise(grey, 0.001, np.random.default_rng(0)).astype(float)
    luma_sd = (noisy @ [0.299, 0.587, 0.114]).std()
    assert abs(luma_sd - math.sqrt(0.001) * 255 * 255 / 219) < 0.5  # 9.4 levels of 255
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    assert ch.blur(checker, 7).std() < 0.2 * checker.std()
    assert ch.downsample(checker, 2).std() < 0.2 * checker.std()
    k = ch.gaussian_kernel(9)
    assert (
        abs(k.sum() - 1) < 1e-12
        and len(k) == 9
        and abs(np.sqrt((k * (np.arange(9) - 4) ** 2).sum()) - 1.5) < 0.05
    )


def _tiny_images(tmp_path, n=6):
    from streetvision.models.data import ImageDataset
    from streetvision.models.network import create_transform

    for i in range(n):
        _photo(120, 90, seed=i).save(tmp_path / f"{i}.jpg")
    prep = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.5] * 3,
            "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip
    return ImageDataset(
        tmp_path, [f"{i}.jpg" for i in range(n)], np.arange(n) % 2, create_transform(prep), 32
    )


def test_challenge_views_are_seeded_and_spread_over_the_levels(tmp_path):
    import torch

    from streetvision.models.data import ChallengeViews

    images = _tiny_images(tmp_path)
    a, b, c = (
        ChallengeViews(images, 4, seed=1),
        ChallengeViews(images, 4, seed=1),
        ChallengeViews(images, 4, seed=2),
    )
    assert len(a) == 24 and np.bincount(a.rows()[:, 1]).tolist() == [6, 6, 6, 6]
    assert a.rows()[:, 0].tolist() == np.repeat(np.arange(6), 4).tolist()
    x, y, k = a[9]
    assert k == 9 and y == images.labels[2] and torch.equal(x, b[9][0]) and not torch.equal(x, c[9][0])


def test_challenge_augmentation_draws_from_torchs_generator(tmp_path):
    import torch

    from streetvision.models.data import ChallengeAugment

    augment = ChallengeAugment(_tiny_images(tmp_path).transform)
    image = _photo(120, 90)
    torch.manual_seed(0)
    first = [augment(image) for _ in range(3)]
    torch.manual_seed(0)
    again = [augment(image) for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1]) and first[0].shape == (3, 32, 32)


@pytest.mark.slow
def test_training_on_challenge_views_turns_the_feature_cache_off(demo_pack, tmp_path):
    from streetvision.config import load_config
    from streetvision.io.manifests import verify_dir
    from streetvision.steps import train_baseline

    overrides = ["model.backbone=test_efficientnet", "model.pretrained=false", "model.freeze_backbone=true",
                 "data.image_size=64", "data.augment=challenge", "trainer.max_epochs=1",
                 "trainer.accelerator=cpu", "trainer.devices=1", "eval.challenge_views=2"]  # fmt: skip
    cfg = load_config(train_baseline.Config, [], overrides)
    train_baseline.run(cfg, shards=demo_pack, out=tmp_path / "p1")
    m = verify_dir(tmp_path / "p1", "train_baseline")
    assert m.extra["feature_cache"] is False
    calib = np.load(tmp_path / "p1" / "labels_val_calib.npy")
    views = np.load(tmp_path / "p1" / "views_val_calib_challenge.npy")
    assert len(np.load(tmp_path / "p1" / "logits_val_calib_challenge.npy")) == len(views) == 2 * len(calib)
