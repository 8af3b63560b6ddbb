"""adapt_explora, ``adapt_explora``: ExPLoRA's parameter budget, DINO's teacher, merge parity, the step and its
lineage into train_baseline, on ``test_vit`` (the block layout of DINOv2's ViTs) and the demo data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import PACK, TINY_TRAIN, pack, run_cli
from poison import poisoned_copy

from streetvision.config import load_config
from streetvision.io.manifests import MANIFEST, input_record, verify_dir
from streetvision.models.lora import QVLoRA, apply_explora, expected_trainable
from streetvision.steps import adapt_explora

# A quick ExPLoRA on test_vit at 64 px: 2 local crops of 32 px, a small head.
QUICK = [
    "model.backbone=test_vit", "model.pretrained=false", "data.image_size=64", "data.batch_size=16",
    "data.local_crops=2", "explora.prototypes=256", "explora.head_hidden=128", "explora.bottleneck=64",
    "explora.lr=3e-4", "trainer.max_epochs=6", "trainer.accelerator=cpu", "trainer.devices=1",
]  # fmt: skip


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "streetvision", *map(str, args)], capture_output=True, text=True, **kw
    )


def adapt(shards, out, *overrides):
    return adapt_explora.run(
        load_config(adapt_explora.Config, [], [*QUICK, *overrides]), shards=shards, out=out
    )


def vit(name="test_vit", **kw):
    import timm

    return timm.create_model(name, pretrained=False, num_classes=0, **kw)


def block_params(model) -> int:
    return sum(p.numel() for p in model.blocks[0].parameters())


def budget(model, rank: int, unfrozen: int) -> int:
    """ExPLoRA's trainable count from the ViT's dimensions (timm's own block, untouched)."""
    d = model.embed_dim
    norms = sum(p.numel() for n, p in model.blocks[0].named_parameters() if "norm" in n)
    return expected_trainable(d, len(model.blocks), block_params(model), norms, rank=rank, unfrozen=unfrozen,
                              final_norm=sum(p.numel() for p in model.norm.parameters()))  # fmt: skip


def test_vit_b14_at_rank_64_with_one_unfrozen_block_trains_the_papers_9_3_million_parameters():
    model = vit("vit_base_patch14_dinov2", img_size=224)
    counts = apply_explora(model, rank=64, alpha=64, unfrozen=1)
    print(f"\nViT-B/14, r=64, 1 unfrozen block: {counts}")
    assert counts["total"] == budget(vit("vit_base_patch14_dinov2", img_size=224), 64, 1)
    assert 9.2e6 < counts["total"] < 9.4e6  # the paper's ~9.3M
    assert counts["lora"] == 11 * 4 * 768 * 64


def test_only_the_intended_parameters_receive_gradients():
    from streetvision.models.dino import ExploraModule

    model = vit(img_size=64, dynamic_img_size=True)
    counts = apply_explora(model, rank=4, alpha=4, unfrozen=2)
    assert counts["total"] == budget(vit(img_size=64), 4, 2)
    module = ExploraModule(model, prototypes=32, head_hidden=16, bottleneck=8, lr=1e-3, weight_decay=0.0,
                           warmup_epochs=0, teacher_momentum=0.99, student_temp=0.1, teacher_temp=0.04,
                           center_momentum=0.9, koleo_weight=0.1, global_crops=2)  # fmt: skip
    crops = [torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64), torch.randn(4, 3, 32, 32)]
    with torch.no_grad():
        teacher, _ = module.teacher(crops[:2])
    student, features = module.student(crops)
    loss = module.loss(student, teacher)
    loss.backward()
    got = {n for n, p in module.student.backbone.named_parameters() if p.grad is not None}
    trainable = {n for n, p in module.student.backbone.named_parameters() if p.requires_grad}
    assert got == trainable  # every trainable parameter gets a gradient...
    # (A of LoRA a zero one while B is still at its zero init; B a real one)
    assert all(p.grad.abs().sum() > 0 for n, p in module.student.backbone.named_parameters() if "lora_b" in n)
    assert (
        sum(p.numel() for n, p in module.student.backbone.named_parameters() if n in got) == counts["total"]
    )
    frozen = [n for n, p in module.student.backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(
        module.student.backbone.get_parameter(n).grad is None for n in frozen
    )  # ...nothing else
    assert any("lora_" in n for n in got) and any(".norm" in n or n.startswith("norm") for n in got)
    assert not any(n.startswith(("patch_embed", "pos_embed", "cls_token")) for n in got)
    assert all(p.grad is None for p in module.teacher.parameters())


def test_the_teacher_is_an_ema_of_the_student_and_its_frozen_part_stays_the_students():
    from streetvision.models.dino import ExploraModule, ema_update

    model = vit(img_size=64)
    apply_explora(model, rank=4, alpha=4, unfrozen=1)
    module = ExploraModule(model, prototypes=32, head_hidden=16, bottleneck=8, lr=1e-3, weight_decay=0.0,
                           warmup_epochs=0, teacher_momentum=0.99, student_temp=0.1, teacher_temp=0.04,
                           center_momentum=0.9, koleo_weight=0.0, global_crops=2)  # fmt: skip
    before = {n: p.detach().clone() for n, p in module.teacher.named_parameters()}
    with torch.no_grad():
        for p in module.student.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    ema_update(module.teacher, module.student, 0.9)
    student = dict(module.student.named_parameters())
    for n, t in module.teacher.named_parameters():
        if student[n].requires_grad:
            torch.testing.assert_close(t, 0.9 * before[n] + 0.1 * student[n].detach())
            assert not torch.equal(t, student[n])
        else:
            assert torch.equal(t, before[n]) and torch.equal(t, student[n])


def test_merged_adapters_give_the_adapted_outputs_and_load_into_timm_by_its_own_names(demo_dataset):
    from streetvision.models.network import preprocessing
    from streetvision.steps.adapt_explora import load_eval, merge_checked

    model = vit(img_size=64)
    reference_keys = set(model.state_dict())
    apply_explora(model, rank=4, alpha=8, unfrozen=1)
    with torch.no_grad():  # a trained-looking adapter: B is no longer zero
        for m in model.modules():
            if isinstance(m, QVLoRA):
                m.lora_b_q.normal_(0, 0.5)
                m.lora_b_v.normal_(0, 0.5)
    model.eval()
    images = [load_eval(p, preprocessing(model, 64)) for p in sorted((demo_dataset / "images").iterdir())[:8]]
    merged, gap = merge_checked(model, images)
    assert gap < 1e-4
    assert set(merged.state_dict()) == reference_keys and not any(
        isinstance(m, QVLoRA) for m in merged.modules()
    )
    fresh = vit(img_size=64)
    fresh.load_state_dict(merged.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            fresh(torch.stack(images)), model(torch.stack(images)), atol=1e-4, rtol=1e-4
        )
    # The adapter changed the network: parity is not the trivial kind.
    with torch.no_grad():
        assert (fresh(torch.stack(images)) - vit(img_size=64).eval()(torch.stack(images))).abs().max() > 1e-3


@pytest.fixture(scope="module")
def adapted(demo_pack, tmp_path_factory):
    out = tmp_path_factory.mktemp("explora") / "adapt_explora"
    r = cli("adapt-explora", "--shards", demo_pack, "--out", out, *QUICK)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


@pytest.mark.slow
def test_adapting_commits_a_timm_loadable_merged_backbone_and_the_loss_decreases(
    adapted, demo_splits, demo_pack
):
    out, stdout = adapted
    m = verify_dir(out, "adapt_explora")
    assert {"backbone.safetensors", "model.json", "history.csv", "config.yaml"} <= set(m.outputs)
    info = json.loads((out / "model.json").read_text())
    assert info["trainable"]["total"] == m.metrics["trainable_parameters"] == budget(vit(img_size=64), 8, 1)
    assert f"{info['trainable']['total']:,} trainable backbone parameters" in stdout  # printed
    assert m.metrics["last_epoch_loss"] < m.metrics["first_epoch_loss"]  # self-distillation learns
    assert m.metrics["merge_max_abs_diff"] <= info["merge_tolerance"]
    assert m.inputs["shards"]["manifest_sha256"] == input_record(demo_pack)["manifest_sha256"]
    assert m.inputs["splits"]["manifest_sha256"] == input_record(demo_splits)["manifest_sha256"]
    assert info["images"] == {
        "train": len(json.loads((demo_splits / "splits.json").read_text())["train"]),
        "extra": 0,
    }
    from streetvision.models.network import create_backbone

    loaded = create_backbone("test_vit", pretrained=False, weights_file=str(out / "backbone.safetensors"),
                             arch={"img_size": 64})  # fmt: skip
    assert not torch.equal(loaded.blocks[-1].mlp.fc1.weight, vit(img_size=64).blocks[-1].mlp.fc1.weight)


@pytest.mark.slow
def test_phase_1_trains_on_the_adapted_backbone_to_a_verified_bundle_with_the_lineage_chain(
    adapted, demo_splits, demo_pack, tmp_path
):
    out, _ = adapted
    p1 = tmp_path / "p1"
    r = cli("train-baseline", "--shards", demo_pack, "--explora", out, "--out", p1,
            "model.backbone=test_vit", "model.pretrained=false", "data.image_size=64", "trainer.max_epochs=1",
            "trainer.accelerator=cpu", "trainer.devices=1", "eval.challenge_views=1")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    m1 = verify_dir(p1, "train_baseline")
    assert m1.inputs["explora"]["manifest_sha256"] == input_record(out)["manifest_sha256"]
    for step, args in (("sweep-thresholds", ["--baseline", p1]),
                       ("export-bundle", ["--baseline", p1, "--policy", tmp_path / "p2", "--splits", demo_splits])):  # fmt: skip
        r = cli(step, *args, "--out", tmp_path / ("p2" if step == "sweep-thresholds" else "b"))
        assert r.returncode == 0, r.stderr
    bundle = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert bundle["lineage"]["baseline"]["manifest_sha256"] == input_record(p1)["manifest_sha256"]
    assert cli("verify", tmp_path / "b").returncode == 0
    # model.weights naming the adapt_explora folder is the same input; another backbone is refused in one line.
    r = cli("train-baseline", "--shards", demo_pack, "--out", tmp_path / "p1b",
            "model.backbone=test_vit", f"model.weights={out}", "data.image_size=96", "trainer.max_epochs=1",
            "trainer.accelerator=cpu", "trainer.devices=1", "eval.challenge_views=0")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert verify_dir(tmp_path / "p1b").inputs["explora"]["uri"] == str(out)
    r = cli("train-baseline", "--shards", demo_pack, "--explora", out, "--out", tmp_path / "p1c", *TINY_TRAIN)
    assert r.returncode == 2 and "adapted test_vit, but model.backbone is test_efficientnet" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_val_select_val_calib_and_val_test_never_reach_the_adaptation(
    demo_dataset, demo_splits, demo_pack, tmp_path
):
    """Scramble every image outside train and flip its label: the adapted backbone must not change."""
    poisoned, same_splits = poisoned_copy(demo_dataset, demo_splits, tmp_path,
                                          scramble=("val_select", "val_calib", "val_test"))  # fmt: skip
    clean = adapt(demo_pack, tmp_path / "clean", "trainer.max_epochs=2")
    dirty = adapt(
        pack(poisoned, same_splits, tmp_path / "dirty_pack"), tmp_path / "dirty", "trainer.max_epochs=2"
    )
    assert clean.outputs["backbone.safetensors"]["sha256"] == dirty.outputs["backbone.safetensors"]["sha256"]
    assert clean.outputs["history.csv"]["sha256"] == dirty.outputs["history.csv"]["sha256"]
    assert clean.inputs["dataset"]["content_sha256"] != dirty.inputs["dataset"]["content_sha256"]
    # ...and the train split does reach it, so the comparison above could have failed.
    train_poisoned, train_splits = poisoned_copy(
        demo_dataset, demo_splits, tmp_path / "t", scramble=("train",)
    )
    moved = adapt(
        pack(train_poisoned, train_splits, tmp_path / "moved_pack"),
        tmp_path / "moved",
        "trainer.max_epochs=2",
    )
    assert moved.outputs["backbone.safetensors"]["sha256"] != clean.outputs["backbone.safetensors"]["sha256"]


@pytest.mark.slow
def test_runs_on_the_object_store_with_extra_images(s3, demo_dataset, demo_splits, tmp_path):
    from streetvision.io import store

    store.upload_tree(demo_dataset, f"{s3}/data")
    store.upload_dir(demo_splits, f"{s3}/splits")
    store.upload_tree(demo_dataset / "images", f"{s3}/extra")  # unlabelled street images
    r = cli(
        "pack-shards", "--dataset", f"{s3}/data", "--splits", f"{s3}/splits", "--out", f"{s3}/shards", *PACK
    )
    assert r.returncode == 0, r.stderr[-2000:]
    r = cli("adapt-explora", "--shards", f"{s3}/shards", "--out", f"{s3}/p4", *QUICK,
            "trainer.max_epochs=1", f"explora.extra_images={s3}/extra")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    manifest, _ = store.verified(f"{s3}/p4", "adapt_explora")
    assert (
        manifest.inputs["extra_images"]["uri"] == f"{s3}/extra"
        and manifest.inputs["extra_images"]["images"] == "80"
    )
    assert manifest.inputs["dataset"]["uri"] == f"{s3}/data"
    r = cli("train-baseline", "--shards", f"{s3}/shards", "--explora", f"{s3}/p4",
            "--out", f"{s3}/p1", "model.backbone=test_vit", "data.image_size=64", "trainer.max_epochs=1",
            "trainer.accelerator=cpu", "trainer.devices=1", "eval.challenge_views=0")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert store.verified(f"{s3}/p1", "train_baseline")[0].inputs["explora"]["uri"] == f"{s3}/p4"


def test_what_explora_cannot_adapt_is_one_line_before_any_work(demo_pack, tmp_path, capsys):
    bad = tmp_path / "extra"
    bad.mkdir()
    (bad / "broken.jpg").write_text("not an image")
    cases = [
        (["model.backbone=test_efficientnet"], "ExPLoRA adapts timm ViTs"),
        (["data.image_size=72"], "multiple of the patch size 16"),
        (["explora.unfrozen_blocks=7"], "the backbone has 6 blocks"),
        ([f"explora.extra_images={bad}"], "1 unreadable"),
        ([f"explora.extra_images={tmp_path / 'none'}"], "not a folder"),
    ]
    for (
        extra,
        expect,
    ) in cases:  # in this process: the CLI's one line without paying torch's import five times
        code, _, err = run_cli(capsys, ["adapt-explora", "--shards", demo_pack, "--out", tmp_path / "o", *QUICK,
                                        *extra])  # fmt: skip
        assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err, (extra, err)
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_an_adaptation_killed_after_an_epoch_resumes_to_identical_weights(demo_pack, tmp_path):
    from streetvision.models.checkpoint import CHECKPOINT, load

    def argv(out, ckpt):
        return ["adapt-explora", "--shards", demo_pack, "--out", out, *QUICK,
                "trainer.max_epochs=4", f"trainer.checkpoint_uri={ckpt}"]  # fmt: skip

    assert cli(*argv(tmp_path / "whole", tmp_path / "ck-whole")).returncode == 0
    ckpt = tmp_path / "ck"
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "streetvision", *map(str, argv(tmp_path / "resumed", ckpt))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    deadline = time.time() + 120
    while not ((ckpt / CHECKPOINT).exists() and load(ckpt / CHECKPOINT)["epoch"] >= 1):
        assert time.time() < deadline and proc.poll() is None, "adaptation ended before it could be killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "resumed" / MANIFEST).exists()
    r = cli(*argv(tmp_path / "resumed", ckpt))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = verify_dir(tmp_path / "whole"), verify_dir(tmp_path / "resumed")
    assert b.extra["resumed"] and not a.extra["resumed"]
    assert a.outputs["backbone.safetensors"]["sha256"] == b.outputs["backbone.safetensors"]["sha256"]
    assert np.isclose(a.metrics["last_epoch_loss"], b.metrics["last_epoch_loss"])


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_commits_once_with_the_centre_and_teacher_in_step(demo_pack, tmp_path):
    """Two gloo ranks: each sees half the train split, the centre is averaged over both, rank 0 commits."""
    ddp = [o for o in QUICK if not o.startswith("trainer.devices")] + ["trainer.devices=2", "trainer.strategy=ddp",
                                                                       "trainer.max_epochs=2"]  # fmt: skip
    r = cli("adapt-explora", "--shards", demo_pack, "--out", tmp_path / "ddp", *ddp)
    assert r.returncode == 0, r.stderr[-3000:]
    m = verify_dir(tmp_path / "ddp", "adapt_explora")
    assert m.extra["world_size"] == 2 and m.metrics["merge_max_abs_diff"] <= adapt_explora.MERGE_TOLERANCE
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


@pytest.mark.slow
def test_streetvision_run_runs_phase_4_before_phase_1_when_named(tmp_path):
    from streetvision.pipeline import run_local

    settings = ["demo.n=64", "demo.size=32", "model.backbone=test_vit", "model.pretrained=false",
                "data.image_size=32", "data.batch_size=16", "trainer.max_epochs=1", "trainer.accelerator=cpu",
                "trainer.devices=1", "data.local_crops=1", "explora.prototypes=64", "explora.head_hidden=32",
                "explora.bottleneck=16", "eval.challenge_views=1", "data.augment=none",
                "adapt_explora.trainer.max_epochs=2"]  # fmt: skip
    phases = "pipeline.phases=[make_splits,pack_shards,adapt_explora,train_baseline,sweep_thresholds,export_bundle]"
    summary = run_local(str(tmp_path / "run"), overrides=[*settings, phases])
    assert all(
        summary["steps"][s].startswith("ran") for s in ("adapt_explora", "train_baseline", "export_bundle")
    )
    p4 = verify_dir(tmp_path / "run" / "adapt_explora", "adapt_explora")
    assert p4.config["model"]["backbone"] == "test_vit" and p4.config["trainer"]["max_epochs"] == 2  # its own
    p1 = verify_dir(tmp_path / "run" / "train_baseline", "train_baseline")
    assert (
        p1.inputs["explora"]["manifest_sha256"]
        == input_record(tmp_path / "run" / "adapt_explora")["manifest_sha256"]
    )
    again = run_local(str(tmp_path / "run"), overrides=[*settings, phases])
    assert again["steps"]["train_baseline"] == "up to date, skipped"
    # Without adapt_explora, train_baseline no longer reads it: it trains again, from the hub's (here random) weights.
    without = run_local(
        str(tmp_path / "run"),
        overrides=[
            *settings,
            "pipeline.phases=[make_splits,pack_shards,train_baseline,sweep_thresholds,export_bundle]",
        ],
    )
    assert without["steps"]["train_baseline"].startswith("ran")
    assert "explora" not in verify_dir(tmp_path / "run" / "train_baseline").inputs


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_weights(demo_pack, tmp_path):
    plain = adapt(demo_pack, tmp_path / "plain", "trainer.max_epochs=1")
    saved = adapt(
        demo_pack,
        tmp_path / "ckpt",
        "trainer.max_epochs=1",
        "explora.gradient_checkpointing=true",
    )
    assert saved.config["explora"]["gradient_checkpointing"] is True
    from safetensors.torch import load_file

    a, b = (load_file(p / "backbone.safetensors") for p in (tmp_path / "plain", tmp_path / "ckpt"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    assert plain.metrics["last_epoch_loss"] == pytest.approx(saved.metrics["last_epoch_loss"], rel=1e-4)
