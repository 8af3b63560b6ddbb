"""Shared fixtures: a real SeaweedFS S3 server on 127.0.0.1, and an environment pointing boto3 at it."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import seaweed  # noqa: E402

from streetvision.io import store  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    try:
        server = seaweed.start(tmp_path_factory.mktemp("seaweed"))
    except RuntimeError as e:
        pytest.fail(f"could not start the local S3 server: {e}")
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Point the store at the local S3 server; yields a fresh ``s3://bucket/prefix`` for the test."""
    for k in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    store.client.cache_clear()
    yield f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:10]}"
    store.client.cache_clear()


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """A small generated dataset (80 images, 64 px), shared read-only by the tests."""
    from streetvision.data.demo import write_demo_dataset

    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "data", n=80, seed=7, size=64)


@pytest.fixture(scope="session")
def demo_splits(demo_dataset, tmp_path_factory):
    from streetvision.config import load_config
    from streetvision.steps import make_splits

    out = tmp_path_factory.mktemp("splits") / "make_splits"
    make_splits.run(load_config(make_splits.Config), dataset=demo_dataset, out=out)
    return out


TINY_TRAIN = [
    "model.backbone=test_efficientnet",
    "model.pretrained=false",
    "model.freeze_backbone=false",
    "data.image_size=64",
    "data.batch_size=16",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "data.augment=none",  # plumbing, not quality: the default, challenge views, is tested on its own
]


@pytest.fixture(scope="session")
def trained(demo_dataset, demo_splits, tmp_path_factory):
    """A real phase-1 and phase-2 output from a tiny model: {'phase1', 'policy', 'splits', 'dataset'}."""
    from streetvision.config import load_config
    from streetvision.steps import sweep_thresholds, train_baseline

    root = tmp_path_factory.mktemp("trained")
    train_baseline.run(
        load_config(train_baseline.Config, [], TINY_TRAIN),
        dataset=demo_dataset,
        splits=demo_splits,
        out=root / "train_baseline",
    )
    sweep_thresholds.run(
        load_config(sweep_thresholds.Config), phase1=root / "train_baseline", out=root / "sweep_thresholds"
    )
    return {
        "phase1": root / "train_baseline",
        "policy": root / "sweep_thresholds",
        "splits": demo_splits,
        "dataset": demo_dataset,
    }


@pytest.fixture(scope="session", autouse=True)
def _hash_cache(tmp_path_factory):
    """Keep the content-hash cache of the tests inside pytest's own temporary folder."""
    import os

    os.environ["STREETVISION_CACHE_DIR"] = str(tmp_path_factory.mktemp("hash-cache"))


def run_cli(capsys, argv: list) -> tuple[int, str, str]:
    """The CLI in this process (imports paid once); usage errors exit through SystemExit."""
    from streetvision.cli import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err
