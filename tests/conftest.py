"""Shared fixtures: a real SeaweedFS S3 server on 127.0.0.1, and an environment pointing boto3 at it."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import seaweed  # noqa: E402

from streetvision.io import store  # noqa: E402

# The longest test files first. `make test` gives each pytest-xdist worker a file at a time in collection
# order: started early, the long files run beside many short ones, and the workers finish together.
LONGEST_FIRST = ("test_train_baseline.py", "test_adapt_explora.py", "test_faults_store.py", "test_local_run.py",
                 "test_readme.py", "test_faults_kills.py", "test_faults.py", "test_kfp.py", "test_images.py",
                 "test_train_gate.py", "test_publish.py")  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


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
    store.reset_clients()
    yield f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:10]}"
    store.reset_clients()


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


@pytest.fixture(scope="session")
def demo_pack(demo_dataset, demo_splits, tmp_path_factory):
    """The demo splits packed (small chunks: several per split, as a real pack has)."""
    return pack(demo_dataset, demo_splits, tmp_path_factory.mktemp("pack") / "pack_shards")


PACK = ["pack.chunk_bytes=65536", "pack.workers=1"]


def pack(dataset, splits, out, *overrides):
    """pack_shards of a dataset and its splits (the tests' small chunks); returns ``out``."""
    from streetvision.config import load_config
    from streetvision.steps import pack_shards

    config = load_config(pack_shards.Config, [], [*PACK, *overrides])
    pack_shards.run(config, dataset=dataset, splits=splits, out=out)
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
def trained(demo_dataset, demo_splits, demo_pack, tmp_path_factory):
    """A real train_baseline and sweep_thresholds output from a tiny model: {'baseline', 'policy', 'splits',
    'dataset', 'shards'}."""
    from streetvision.config import load_config
    from streetvision.steps import sweep_thresholds, train_baseline

    root = tmp_path_factory.mktemp("trained")
    train_baseline.run(
        load_config(train_baseline.Config, [], TINY_TRAIN),
        shards=demo_pack,
        out=root / "train_baseline",
    )
    sweep_thresholds.run(
        load_config(sweep_thresholds.Config), baseline=root / "train_baseline", out=root / "sweep_thresholds"
    )
    return {
        "baseline": root / "train_baseline",
        "policy": root / "sweep_thresholds",
        "splits": demo_splits,
        "dataset": demo_dataset,
        "shards": demo_pack,
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


# The fault suites' committed fixtures (tests/test_faults*.py): quick settings of the training steps.
GATE = ["trainer.max_epochs=2", "gate.train_views=1"]  # a quick train_gate
EXPLORA = ["model.backbone=test_vit", "model.pretrained=false", "data.image_size=32", "data.local_crops=1",
           "explora.prototypes=64", "explora.head_hidden=32", "explora.bottleneck=16", "trainer.max_epochs=1",
           "trainer.accelerator=cpu", "trainer.devices=1"]  # a quick adapt_explora  # fmt: skip
ON_EXPLORA = ["model.backbone=test_vit", "model.pretrained=false", "data.image_size=32", "trainer.max_epochs=1",
              "trainer.accelerator=cpu", "trainer.devices=1", "eval.challenge_views=0"]  # train_baseline on it  # fmt: skip


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err


@pytest.fixture(scope="session")
def world(trained, tmp_path_factory):
    """A committed pipeline (splits, train_baseline, policy, bundle) plus a second, unrelated lineage."""
    from streetvision.data.demo import write_demo_dataset

    root = tmp_path_factory.mktemp("faults")
    bundle = root / "export_bundle"
    from streetvision.cli import main

    code = main(["export-bundle", "--baseline", str(trained["baseline"]), "--policy", str(trained["policy"]),
                 "--splits", str(trained["splits"]), "--out", str(bundle)])  # fmt: skip
    assert code == 0
    other = write_demo_dataset(root / "other_data", n=40, seed=11, size=48)
    assert main(["make-splits", "--dataset", str(other), "--out", str(root / "other_splits")]) == 0
    from baseline_fake import fake_baseline, separable_logits

    pack(other, root / "other_splits", root / "other_shards")
    logits, labels = separable_logits(60, seed=3)
    fake_baseline(root / "other_baseline", logits, labels)
    assert (
        main(
            [
                "sweep-thresholds",
                "--baseline",
                str(root / "other_baseline"),
                "--out",
                str(root / "other_policy"),
            ]
        )
        == 0
    )
    image = sorted((trained["dataset"] / "images").iterdir())[0]
    gate = root / "train_gate"
    code = main(["train-gate", "--baseline", str(trained["baseline"]), "--shards", str(trained["shards"]),
                 "--out", str(gate), *GATE])  # fmt: skip
    assert code == 0
    explora = root / "adapt_explora"
    code = main(["adapt-explora", "--shards", str(trained["shards"]), "--out", str(explora), *EXPLORA])
    assert code == 0
    return {**trained, "bundle": bundle, "root": root, "image": image, "other_data": other, "gate": gate,
            "explora": explora,
            "other_splits": root / "other_splits", "other_shards": root / "other_shards",
            "other_policy": root / "other_policy",
            "other_baseline": root / "other_baseline"}  # fmt: skip


def step_commands(world) -> dict[str, list]:
    """Each step's command line on the committed fixtures, without ``--out``."""
    w = {k: str(v) for k, v in world.items()}
    return {
        "make_splits": ["make-splits", "--dataset", w["dataset"]],
        "pack_shards": ["pack-shards", "--dataset", w["dataset"], "--splits", w["splits"], *PACK],
        "train_baseline": ["train-baseline", "--shards", w["shards"], *TINY_TRAIN],
        "sweep_thresholds": ["sweep-thresholds", "--baseline", w["baseline"]],
        "train_gate": ["train-gate", "--baseline", w["baseline"], "--shards", w["shards"], *GATE],
        "adapt_explora": ["adapt-explora", "--shards", w["shards"], *EXPLORA],
        "calibrate_scrc": ["calibrate-scrc", "--baseline", w["baseline"], "scrc.alpha=0.9"],  # a tiny val_calib
        "export_bundle": ["export-bundle", "--baseline", w["baseline"], "--policy", w["policy"], "--splits", w["splits"]],
    }  # fmt: skip
