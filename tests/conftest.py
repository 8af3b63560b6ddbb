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
