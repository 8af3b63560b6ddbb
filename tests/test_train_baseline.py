"""train_baseline on tiny timm models (pretrained=False) and a small generated dataset."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PACK, TINY_TRAIN, one_line, pack, run_cli
from poison import poisoned_copy

from streetvision.config import load_config
from streetvision.data.dataset import content_identity
from streetvision.io import store
from streetvision.io.atomic import compute_file_sha256
from streetvision.io.manifests import MANIFEST, verify_dir
from streetvision.steps import train_baseline

pytestmark = pytest.mark.slow

TINY = TINY_TRAIN


def cli(*args):
    return subprocess.run([sys.executable, "-m", "streetvision", *args], capture_output=True, text=True)


def cli_train(shards, out, *overrides):
    return cli("train-baseline", "--shards", str(shards), "--out", str(out), *overrides)


def train(shards, out, *overrides):
    cfg = load_config(train_baseline.Config, [], [*TINY, *overrides])
    return train_baseline.run(cfg, shards=shards, out=out)


def history_without_timing(out):
    import csv

    rows = list(csv.DictReader((out / "history.csv").read_text().splitlines()))
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


EXPECTED = {
    "model.safetensors",
    "model.json",
    "history.csv",
    "metrics.json",
    "config.yaml",
    *(
        f"{kind}_{s}.{ext}"
        for s in ("val_select", "val_calib", "val_test")
        for kind, ext in (("logits", "npy"), ("labels", "npy"), ("ids", "json"))
    ),
    *(f"{kind}_{s}_challenge.npy" for s in ("val_calib", "val_test") for kind in ("logits", "views")),
}


def test_cli_run_commits_every_output_with_lineage(demo_dataset, demo_splits, demo_pack, tmp_path):
    """With loader workers too: each worker ends its share of a split on a partial batch of its own, and
    every image is still scored in every validation (a length-bound loop once stopped short of them)."""
    import csv

    out = tmp_path / "p1"
    r = cli_train(demo_pack, out, *TINY, "data.num_workers=2")
    assert r.returncode == 0, r.stderr
    m = verify_dir(out)
    assert set(m.outputs) == EXPECTED
    assert m.inputs["shards"]["manifest_sha256"] == compute_file_sha256(demo_pack / MANIFEST)
    assert m.inputs["splits"]["manifest_sha256"] == compute_file_sha256(demo_splits / MANIFEST)
    assert m.inputs["dataset"]["content_sha256"] == content_identity(demo_dataset)
    assert m.config["model"]["backbone"] == "test_efficientnet"
    splits = json.loads((demo_splits / "splits.json").read_text())
    for s in ("val_select", "val_calib", "val_test"):
        logits = np.load(out / f"logits_{s}.npy")
        assert logits.shape == (len(splits[s]), 1) and np.isfinite(logits).all()
        assert sorted(json.loads((out / f"ids_{s}.json").read_text())) == sorted(splits[s])
    model = json.loads((out / "model.json").read_text())
    assert model["preprocessing"]["input_size"] == [3, 64, 64] and model["class_names"][1] == "roadwork"
    assert "val_select_mcc" in m.metrics and "val_test_mcc" not in m.metrics
    validation = [r for r in csv.DictReader((out / "history.csv").open()) if r["val_select_n"]]
    assert len(validation) == 2 and all(
        float(r["val_select_n"]) == len(splits["val_select"]) for r in validation
    )


def test_same_seed_twice_gives_identical_weights_on_cpu(demo_dataset, demo_splits, demo_pack, tmp_path):
    a = train(demo_pack, tmp_path / "a")
    b = train(demo_pack, tmp_path / "b")
    assert a.outputs["model.safetensors"]["sha256"] == b.outputs["model.safetensors"]["sha256"]
    c = train(demo_pack, tmp_path / "c", "seed=1")
    assert c.outputs["model.safetensors"]["sha256"] != a.outputs["model.safetensors"]["sha256"]


def test_cached_features_train_the_same_head_as_recomputing_them(
    demo_dataset, demo_splits, demo_pack, tmp_path
):
    # One batch an epoch (the train split is 48 images): the cached features are shuffled in memory, the
    # streamed images by litdata, and only the order within the batch differs.
    frozen = [
        "model.freeze_backbone=true",
        "trainer.max_epochs=3",
        "model.lr=0.01",
        "data.batch_size=64",
        "model.dropout=0.0",
    ]  # and no dropout mask, which would fall on other rows
    cached = train(demo_pack, tmp_path / "cached", *frozen)
    direct = train(demo_pack, tmp_path / "direct", *frozen, "trainer.cache_features=false")
    assert cached.extra["feature_cache"] and not direct.extra["feature_cache"]
    for s in ("val_select", "val_calib", "val_test"):
        np.testing.assert_allclose(
            np.load(tmp_path / "cached" / f"logits_{s}.npy"),
            np.load(tmp_path / "direct" / f"logits_{s}.npy"),
            rtol=1e-4,
            atol=1e-5,
        )
    assert cached.metrics["best_epoch"] == direct.metrics["best_epoch"]


def test_val_calib_and_val_test_never_reach_the_optimizer_or_the_stopping_rule(
    demo_dataset, demo_splits, demo_pack, tmp_path
):
    """Scramble every val_calib / val_test image and flip their labels: training must not notice."""
    poisoned, same_splits = poisoned_copy(demo_dataset, demo_splits, tmp_path)
    poisoned_pack = pack(poisoned, same_splits, tmp_path / "poisoned_pack")
    clean = train(demo_pack, tmp_path / "clean", "trainer.max_epochs=3")
    dirty = train(poisoned_pack, tmp_path / "dirty", "trainer.max_epochs=3")
    assert clean.outputs["model.safetensors"]["sha256"] == dirty.outputs["model.safetensors"]["sha256"]
    assert history_without_timing(tmp_path / "clean") == history_without_timing(tmp_path / "dirty")
    assert clean.metrics["best_epoch"] == dirty.metrics["best_epoch"]
    # ...while the held-out outputs do see the change, so the comparison above could have failed.
    assert clean.outputs["labels_val_calib.npy"]["sha256"] != dirty.outputs["labels_val_calib.npy"]["sha256"]


@pytest.mark.parametrize("frozen", [False, True])
def test_ddp_on_two_cpu_processes_yields_every_validation_id_exactly_once(
    demo_dataset, demo_splits, demo_pack, tmp_path, frozen
):
    """Unfrozen, and frozen with the feature cache computed in shares on both ranks and gathered."""
    out = tmp_path / "ddp"
    ddp = [o for o in TINY if not o.startswith(("trainer.devices", "model.freeze_backbone"))] + [
        "trainer.devices=2",
        "trainer.strategy=ddp",
        f"model.freeze_backbone={str(frozen).lower()}",
    ]
    r = cli("train-baseline", "--shards", str(demo_pack), "--out", str(out), *ddp)
    assert r.returncode == 0, r.stderr[-3000:]
    m = verify_dir(out)
    assert m.extra["world_size"] == 2 and m.extra["feature_cache"] == frozen
    splits = json.loads((demo_splits / "splits.json").read_text())
    for s in ("val_select", "val_calib", "val_test"):
        ids = json.loads((out / f"ids_{s}.json").read_text())
        assert len(ids) == len(set(ids)) == len(splits[s]) and set(ids) == set(splits[s])
    import csv

    validation = [r for r in csv.DictReader((out / "history.csv").open()) if r["val_select_n"]]
    assert len(validation) == m.metrics["epochs_run"]  # the CSVLogger's rows: one per validation
    assert all(float(r["val_select_n"]) == len(splits["val_select"]) for r in validation)


def test_dataset_and_outputs_on_the_s3_server_work_the_same(
    s3, demo_dataset, demo_splits, demo_pack, tmp_path
):
    """Every path on the object store (plain http endpoint): packed from s3://, streamed from s3://."""
    store.upload_tree(demo_dataset, f"{s3}/data")
    store.upload_dir(demo_splits, f"{s3}/splits")
    r = cli(
        "pack-shards", "--dataset", f"{s3}/data", "--splits", f"{s3}/splits", "--out", f"{s3}/shards", *PACK
    )
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("train-baseline", "--shards", f"{s3}/shards", "--out", f"{s3}/p1", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    store.verified(f"{s3}/p1", "train_baseline")
    remote = store.download_dir(f"{s3}/p1", tmp_path / "back")
    local = train(demo_pack, tmp_path / "local")
    assert remote.outputs["model.safetensors"] == local.outputs["model.safetensors"]
    assert (
        remote.inputs["dataset"]["uri"] == f"{s3}/data" and remote.inputs["shards"]["uri"] == f"{s3}/shards"
    )


def test_bad_weights_file_fails_with_one_line_and_no_manifest(demo_pack, tmp_path, capsys):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"garbage")
    out = tmp_path / "p1"
    code, _, err = run_cli(capsys, ["train-baseline", "--shards", demo_pack, "--out", out, *TINY,
                                    f"model.weights={bad}"])  # fmt: skip
    assert code == 2 and not (out / MANIFEST).exists()
    assert "could not load pretrained weights" in err and str(bad) in err and one_line(err), err


def test_splits_from_another_dataset_fail_with_one_line_and_no_manifest(
    demo_dataset, demo_splits, demo_pack, tmp_path
):
    other = tmp_path / "other"
    shutil.copytree(demo_dataset, other)
    lines = (other / "labels.csv").read_text().splitlines()
    (other / "labels.csv").write_text("\n".join(lines[:-1]) + "\n")  # one image fewer than the splits name
    out = tmp_path / "packed"
    r = cli("pack-shards", "--dataset", str(other), "--splits", str(demo_splits), "--out", str(out), *PACK)
    assert r.returncode == 2 and not (out / MANIFEST).exists()
    assert (
        "were made from a dataset index" in r.stderr
        and str(other) in r.stderr
        and str(demo_splits) in r.stderr
    )
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_backbone_weights_load_from_a_local_safetensors_file(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from streetvision.models.network import create_backbone

    source = timm.create_model("test_vit", pretrained=False, num_classes=0)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.123)  # weights no fresh initialisation would produce
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    loaded = create_backbone("test_vit", pretrained=False, weights_file=str(tmp_path / "w.safetensors"))
    for (k, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_a_phase_1_model_file_loads_its_backbone_exactly_and_other_weights_are_refused(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from streetvision.models.network import ModelError, build_network, create_backbone

    net = build_network("test_vit", pretrained=False, dropout=0.0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.321)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "model.safetensors")
    loaded = create_backbone("test_vit", pretrained=False, weights_file=str(tmp_path / "model.safetensors"))
    for (k, a), b in zip(net.backbone.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    # Another backbone's weights share no key: refused, naming the first missing and unexpected keys,
    # where timm's lenient load would print "Unexpected keys" and start from random weights.
    save_file(timm.create_model("test_efficientnet", num_classes=0).state_dict(), tmp_path / "e.safetensors")
    with pytest.raises(ModelError, match=r"missing \(first: cls_token\), \d+ unexpected \(first: bn1\."):
        create_backbone("test_vit", pretrained=False, weights_file=str(tmp_path / "e.safetensors"))
    # One key short is as wrong as all of them.
    state = timm.create_model("test_vit", num_classes=0).state_dict()
    del state["norm.bias"]
    save_file(state, tmp_path / "short.safetensors")
    with pytest.raises(ModelError, match=r"1 of test_vit's keys missing \(first: norm.bias\), 0 unexpected"):
        create_backbone("test_vit", pretrained=False, weights_file=str(tmp_path / "short.safetensors"))


def test_a_weights_file_of_another_backbone_fails_training_in_one_line(demo_pack, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("test_vit", num_classes=0).state_dict(), tmp_path / "vit.safetensors")
    out = tmp_path / "p1"
    code, _, err = run_cli(capsys, ["train-baseline", "--shards", demo_pack, "--out", out, *TINY,
                                    f"model.weights={tmp_path / 'vit.safetensors'}"])  # fmt: skip
    assert code == 2 and not (out / MANIFEST).exists()
    assert "does not fit test_efficientnet" in err and one_line(err), err


@pytest.mark.parametrize(
    "backbone,size", [("vit_tiny_patch16_224", 64), ("vit_small_patch14_dinov2.lvd142m", 224)]
)
def test_a_strict_size_vit_trains_exports_and_predicts_at_the_size_it_is_given(
    demo_dataset, demo_splits, demo_pack, tmp_path, backbone, size
):
    """Fixed-size ViTs (position embeddings) are built for data.image_size, and predict rebuilds them so."""
    p1 = tmp_path / "train_baseline"
    settings = [f"model.backbone={backbone}", "model.pretrained=false", f"data.image_size={size}"]
    r = cli_train(
        demo_pack,
        p1,
        *settings,
        "trainer.max_epochs=1",
        "trainer.devices=1",
        "eval.challenge_views=1",
    )  # one view per image is enough to check the sizes
    assert r.returncode == 0, r.stderr[-2000:]
    model = json.loads((p1 / "model.json").read_text())
    assert model["architecture"] == {"img_size": size} and model["preprocessing"]["input_size"] == [
        3,
        size,
        size,
    ]
    for argv in (
        ["sweep-thresholds", "--baseline", p1, "--out", tmp_path / "sweep"],
        ["export-bundle", "--baseline", p1, "--policy", tmp_path / "sweep", "--splits", demo_splits,
         "--out", tmp_path / "bundle"],
    ):  # fmt: skip
        r = cli(*map(str, argv))
        assert r.returncode == 0, r.stderr[-2000:]
    images = sorted((demo_dataset / "images").iterdir())[:3]
    r = cli("predict", "--bundle", str(tmp_path / "bundle"), *map(str, images))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == [str(i) for i in images]


def test_pretrained_weights_without_a_reachable_hub_fail_at_once_with_one_line(
    demo_dataset, demo_splits, demo_pack, tmp_path
):
    """Before: 22 retry lines over 54 s. Now one connection attempt, one line, and what to do instead."""
    import os

    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    r = subprocess.run(
        [sys.executable, "-m", "streetvision", "train-baseline", "--shards", str(demo_pack),
         "--out", str(tmp_path / "p1"), "model.backbone=test_vit", "model.pretrained=true"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "127.0.0.1 cannot be reached" in r.stderr and "model.weights=FILE" in r.stderr


def test_training_reports_its_splits_with_the_policies_own_decision_rule(trained):
    """One rule everywhere: P(roadwork) >= threshold, at 0.5 for selection and training's metrics."""
    from streetvision.eval.sweep import SELECTION_THRESHOLD, metrics_at, probabilities

    reported = json.loads((trained["baseline"] / "metrics.json").read_text())
    for split in ("val_select", "val_calib"):
        logits = np.load(trained["baseline"] / f"logits_{split}.npy")
        labels = np.load(trained["baseline"] / f"labels_{split}.npy")
        assert reported[split] == metrics_at(probabilities(logits), labels, SELECTION_THRESHOLD)
    edge = metrics_at(probabilities(np.zeros((2, 1))), np.array([1, 0]), SELECTION_THRESHOLD)
    assert edge["tp"] == 1 and edge["fp"] == 1  # a logit of exactly 0 is P=0.5: roadwork, as the policy says


def test_a_frozen_backbone_sees_every_image_exactly_once_and_on_the_trainers_device(
    demo_dataset, demo_splits, demo_pack, tmp_path, monkeypatch
):
    """Default settings but augmentation off (frozen backbone, feature cache, precision auto). Where CUDA
    is present every backbone forward pass must run on the GPU; everywhere, no image passes the backbone
    twice."""
    import torch

    from streetvision.models import network

    seen: list[tuple[str, int]] = []
    real = network.create_backbone

    def recording(*a, **k):
        backbone = real(*a, **k)
        backbone.register_forward_pre_hook(lambda m, args: seen.append((args[0].device.type, len(args[0]))))
        return backbone

    overrides = [
        "model.backbone=test_vit",
        "model.pretrained=false",
        "data.image_size=32",
        "trainer.max_epochs=2",
        "data.augment=none",  # the default, challenge views, are new images every epoch: nothing to cache
    ]
    cfg = load_config(train_baseline.Config, [], overrides)
    assert cfg.model.freeze_backbone and cfg.trainer.cache_features and cfg.trainer.precision == "auto"
    monkeypatch.setattr(network, "create_backbone", recording)
    m = train_baseline.run(cfg, shards=demo_pack, out=tmp_path / "p1")
    parts = json.loads((demo_splits / "splits.json").read_text())
    views = cfg.eval.challenge_views * sum(len(parts[s]) for s in ("val_calib", "val_test"))
    assert sum(n for _, n in seen) == views + sum(
        len(parts[s]) for s in ("train", "val_select", "val_calib", "val_test")
    )  # and each challenge view (another image) once
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert {device for device, _ in seen} == {expected}
    assert m.extra["precision"] == ("bf16-mixed" if expected == "cuda" else "32-true")


def test_the_learning_rate_warms_up_linearly_then_follows_a_cosine_to_zero():
    import math
    from types import SimpleNamespace

    import torch

    from streetvision.models.lightning import RoadworkModule
    from streetvision.models.network import RoadworkNet

    backbone = torch.nn.Flatten()
    backbone.num_features = 4
    net = RoadworkNet(backbone, 0.0)
    module = RoadworkModule(
        net, lr=1.0, weight_decay=0.0, warmup_epochs=2, freeze_backbone=False, features_input=True
    )
    module.trainer = SimpleNamespace(estimated_stepping_batches=20, max_epochs=10)
    conf = module.configure_optimizers()
    optimizer, schedule = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    warmup, total = 4, 20  # 2 epochs of 2 steps
    expected = [(s + 1) / (warmup + 1) for s in range(warmup)]
    expected += [
        0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in range(warmup, total)
    ]
    assert lrs == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_training_killed_mid_epoch_resumes_from_its_checkpoint_to_identical_weights(
    demo_dataset, demo_splits, demo_pack, tmp_path, request, where
):
    """Preemption: SIGKILL while a mid-epoch checkpoint is the last one (the streamed loader's position is
    in it), rerun the same command, get the uninterrupted result bit for bit. The interrupted run streams
    the pack from a folder or from the object store, its checkpoints beside it (litdata's saved position
    named the killed process's temporary cache folder, and every resume from an s3:// pack was refused);
    the uninterrupted one reads the folder, so both places also stream the same epochs."""
    import csv
    import signal
    import time

    import torch

    from streetvision.models.checkpoint import CHECKPOINT, load

    steps = 12  # 48 train images in batches of 4; a checkpoint every 5 steps: most of them mid-epoch
    settings = [*TINY, "trainer.max_epochs=4", "trainer.patience=10", "data.batch_size=4",
                "trainer.checkpoint_every_n_steps=5"]  # fmt: skip
    shards, ckpt = str(demo_pack), str(tmp_path / "ck")
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        shards, ckpt = store.join(s3, "pack_shards"), store.join(s3, "ck")
        store.upload_dir(demo_pack, shards)

    def argv(out, ckpt, shards=shards):
        return [sys.executable, "-m", "streetvision", "train-baseline", "--shards", shards,
                "--out", str(out), *settings, f"trainer.checkpoint_uri={ckpt}"]  # fmt: skip

    def last() -> dict | None:
        if store.is_s3(ckpt):
            if not store.exists(store.join(ckpt, CHECKPOINT)):
                return None
            return load(
                store.download_file(store.join(ckpt, CHECKPOINT), tmp_path / "last" / CHECKPOINT).path
            )
        return load(Path(ckpt, CHECKPOINT)) if Path(ckpt, CHECKPOINT).exists() else None

    def mid_epoch() -> bool:
        c = last()
        return c is not None and c["epoch"] >= 1 and c["global_step"] % steps != 0

    whole = subprocess.run(
        argv(tmp_path / "whole", tmp_path / "ck-whole", str(demo_pack)), capture_output=True, text=True
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}  # what the killed process cannot clean stays here
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen(
        argv(tmp_path / "resumed", ckpt), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.time() + 120
    while True:  # stopped while a mid-epoch checkpoint is the last: then killed
        assert time.time() < deadline and proc.poll() is None, "training ended before it could be killed"
        if mid_epoch():
            proc.send_signal(signal.SIGSTOP)
            if mid_epoch():
                break
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "resumed" / MANIFEST).exists()
    killed = last()
    resumed = subprocess.run(argv(tmp_path / "resumed", ckpt), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = verify_dir(tmp_path / "whole"), verify_dir(tmp_path / "resumed")
    assert b.extra["resumed"] and not a.extra["resumed"] and killed["epoch"] < 3
    said = f"resuming from the checkpoint at {ckpt} (epoch {killed['epoch']}, optimizer step {killed['global_step']})"
    assert said in resumed.stdout  # and says so
    for name in ("model.safetensors", "logits_val_calib.npy", "logits_val_test.npy"):
        assert a.outputs[name]["sha256"] == b.outputs[name]["sha256"], name
    assert (
        a.metrics["best_epoch"] == b.metrics["best_epoch"]
        and a.metrics["epochs_run"] == b.metrics["epochs_run"]
    )
    # The last epoch's weights and optimizer state too (the best epoch may come before the kill), and a
    # history without a gap: every epoch's training loss, bit for bit.
    last_a, last_b = load(tmp_path / "ck-whole" / CHECKPOINT), last()
    assert last_a["epoch"] == last_b["epoch"] == 3
    for key, tensor in last_a["state_dict"].items():
        assert torch.equal(tensor, last_b["state_dict"][key]), key
    stopping_a, stopping_b = (
        {k: v for k, v in c["callbacks"].items() if k.startswith("EarlyStopping")} for c in (last_a, last_b)
    )
    assert str(stopping_a) == str(stopping_b)  # early stopping's patience count carried across the kill
    assert (
        last_a["callbacks"]["BestWeights"]["best_epoch"] == last_b["callbacks"]["BestWeights"]["best_epoch"]
    )
    moments_a, moments_b = (c["optimizer_states"][0]["state"] for c in (last_a, last_b))
    assert all(torch.equal(moments_a[k]["exp_avg"], moments_b[k]["exp_avg"]) for k in moments_a)

    def losses(out):
        return [r["train_loss"] for r in csv.DictReader((out / "history.csv").open())]

    assert losses(tmp_path / "whole") == losses(tmp_path / "resumed") and len(losses(tmp_path / "whole")) == 4


def test_a_checkpoint_of_another_training_is_never_resumed(demo_pack, tmp_path, capsys):
    ckpt = tmp_path / "ck"
    train(demo_pack, tmp_path / "a", "trainer.max_epochs=1", f"trainer.checkpoint_uri={ckpt}")
    capsys.readouterr()
    other = train(
        demo_pack, tmp_path / "b", "trainer.max_epochs=1", "seed=5", f"trainer.checkpoint_uri={ckpt}"
    )
    assert "belongs to another training" in capsys.readouterr().out and not other.extra["resumed"]


def test_each_epoch_has_its_own_batch_order_and_a_resumed_run_gets_the_same_one():
    from streetvision.models.data import EpochShuffle

    sampler = EpochShuffle(50, seed=3)
    orders = []
    for epoch in (0, 1, 2, 1):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert sorted(orders[0]) == list(range(50))
    assert orders[0] != orders[1] != orders[2] and orders[1] == orders[3]
    assert list(EpochShuffle(50, seed=4)) != orders[0]


@pytest.mark.parametrize(
    "backbone,size",
    [
        ("convnext_atto", 64),
        ("convnext_atto", 96),
        ("efficientnet_b0", 64),
        ("efficientnet_b0", 96),
        ("vit_small_patch14_reg4_dinov2.lvd142m", 56),
        ("vit_small_patch14_reg4_dinov2.lvd142m", 112),
    ],
)
def test_any_timm_backbone_at_any_size_trains_exports_and_predicts(
    demo_dataset, demo_splits, demo_pack, tmp_path, capsys, backbone, size
):
    """Backbones with their own pooling (ConvNeXt, EfficientNet, a DINOv2 ViT with registers), random
    weights, two input sizes each, end to end through predict."""
    from streetvision.cli import main

    p1, sweep, bundle = tmp_path / "p1", tmp_path / "sweep", tmp_path / "bundle"
    settings = [f"model.backbone={backbone}", "model.pretrained=false", f"data.image_size={size}"]
    assert main(["train-baseline", "--shards", str(demo_pack), "--out", str(p1),
                 *settings, "trainer.max_epochs=1", "trainer.devices=1", "trainer.accelerator=cpu"]) == 0  # fmt: skip
    assert main(["sweep-thresholds", "--baseline", str(p1), "--out", str(sweep)]) == 0
    assert main(["export-bundle", "--baseline", str(p1), "--policy", str(sweep), "--splits", str(demo_splits),
                 "--out", str(bundle)]) == 0  # fmt: skip
    from streetvision.eval.sweep import probabilities

    ids = json.loads((p1 / "ids_val_test.json").read_text())[:4]
    capsys.readouterr()
    assert main(["predict", "--bundle", str(bundle), *(str(demo_dataset / i) for i in ids)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = probabilities(np.load(p1 / "logits_val_test.npy")[:4])  # predict rebuilt the same network
    assert np.allclose([r["probability"] for r in rows], expected, atol=1e-5)
