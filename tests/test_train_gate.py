"""train_gate, ``train_gate``: a learned gate over train_baseline, and calibrate_scrc and the bundle answering by it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from baseline_fake import fake_baseline, fake_gate, reseal, separable_logits
from conftest import TINY_TRAIN, pack
from poison import poisoned_copy

from streetvision.config import load_config
from streetvision.io.manifests import input_record, verify_dir
from streetvision.steps import calibrate_scrc, export_bundle, train_baseline, train_gate

GATE = ["trainer.max_epochs=4", "gate.train_views=2", "trainer.accelerator=cpu"]


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "streetvision", *map(str, args)], capture_output=True, text=True
    )


def gate_step(baseline, shards, out, *overrides):
    cfg = load_config(train_gate.Config, [], [*GATE, *overrides])
    return train_gate.run(cfg, baseline=baseline, shards=shards, out=out)


@pytest.fixture(scope="module")
def gated(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "train_gate"
    gate_step(trained["baseline"], trained["shards"], out)
    return out


def test_the_gate_starts_as_a_monotone_function_of_the_margin():
    """Before training, the gate ranks images exactly as the margin |2·served − 1| does."""
    import torch

    from streetvision.bundle import served_probability
    from streetvision.eval.sweep import sigmoid
    from streetvision.models.gate import GateNet, gate_scores

    rng = np.random.default_rng(0)
    features, logits = rng.normal(size=(500, 16)).astype(np.float32), rng.normal(0, 3, 500).astype(np.float32)
    gate = GateNet(16, 8, 0.0, 0.3)
    gate.standardise_on(torch.from_numpy(features), torch.from_numpy(logits))
    margin = np.abs(2 * served_probability(sigmoid(logits.astype(np.float64)), 0.3) - 1)
    scores = gate_scores(gate, features, logits)
    assert np.array_equal(np.argsort(scores, kind="stable"), np.argsort(margin, kind="stable"))


@pytest.mark.slow
def test_commits_scores_aligned_with_phase_1s_rows_weights_and_a_report(gated, trained):
    m = verify_dir(gated, "train_gate")
    p1 = trained["baseline"]
    assert {
        "gate.safetensors",
        "model.json",
        "history.csv",
        "metrics.json",
        "report.md",
        "config.yaml",
    } <= set(m.outputs)
    for split in ("val_select", "val_calib", "val_test"):
        scores = np.load(gated / f"gate_{split}.npy")
        assert scores.shape == (len(json.loads((p1 / f"ids_{split}.json").read_text())),)
        assert ((0 <= scores) & (scores <= 1)).all()
    for split in ("val_calib", "val_test"):
        assert np.load(gated / f"gate_{split}_challenge.npy").shape == (
            len(np.load(p1 / f"views_{split}_challenge.npy")),
        )
    assert m.inputs["baseline"]["manifest_sha256"] == input_record(p1)["manifest_sha256"]
    assert m.inputs["splits"]["manifest_sha256"] == input_record(trained["splits"])["manifest_sha256"]
    assert m.inputs["dataset"]["content_sha256"]
    info = json.loads((gated / "model.json").read_text())
    assert info["baseline_weights_sha256"] == verify_dir(p1).outputs["model.safetensors"]["sha256"]
    assert 0 <= info["threshold"] <= 1 and info["num_features"] > 0
    for key in (
        "val_select_gate_auroc",
        "val_select_margin_auroc",
        "val_select_gate_aurc",
        "val_select_margin_aurc",
    ):
        assert np.isfinite(m.metrics[key]), key
    assert (gated / "report.md").read_text().startswith("# Learned gate")


@pytest.mark.slow
def test_val_calib_and_val_test_never_reach_the_gates_fit(demo_dataset, demo_splits, demo_pack, tmp_path):
    """Scramble every val_calib / val_test image and flip their labels: the gate must not notice."""
    poisoned, same_splits = poisoned_copy(demo_dataset, demo_splits, tmp_path)
    runs = {}
    for name, shards in {
        "clean": demo_pack,
        "dirty": pack(poisoned, same_splits, tmp_path / "dirty_pack"),
    }.items():
        p1 = tmp_path / f"p1-{name}"
        train_baseline.run(load_config(train_baseline.Config, [], TINY_TRAIN), shards=shards, out=p1)
        runs[name] = gate_step(p1, shards, tmp_path / f"gate-{name}")
    clean, dirty = runs["clean"], runs["dirty"]
    assert clean.outputs["gate.safetensors"]["sha256"] == dirty.outputs["gate.safetensors"]["sha256"]
    assert clean.outputs["history.csv"]["sha256"] == dirty.outputs["history.csv"]["sha256"]
    assert clean.metrics["threshold"] == dirty.metrics["threshold"]
    # ...while the held-out scores do see the change, so the comparison above could have failed.
    assert clean.outputs["gate_val_calib.npy"]["sha256"] != dirty.outputs["gate_val_calib.npy"]["sha256"]


@pytest.mark.slow
def test_phase_1_logits_that_its_weights_do_not_reproduce_are_refused_in_one_line(trained, tmp_path):
    edited = tmp_path / "p1"
    shutil.copytree(trained["baseline"], edited)
    logits = np.load(edited / "logits_val_calib.npy")
    np.save(edited / "logits_val_calib.npy", logits + 1.0)
    reseal(edited)
    r = cli("train-gate", "--baseline", edited, "--shards", trained["shards"], "--out", tmp_path / "g", *GATE)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "logits_val_calib.npy differs from what its weights compute" in r.stderr
    assert not (tmp_path / "g").exists()


@pytest.mark.slow
def test_runs_on_the_object_store(s3, trained, tmp_path):
    from streetvision.io import store

    for name in ("baseline", "shards"):
        store.upload_dir(trained[name], f"{s3}/{name}")
    r = cli(
        "train-gate", "--baseline", f"{s3}/baseline", "--shards", f"{s3}/shards", "--out", f"{s3}/gate", *GATE
    )
    assert r.returncode == 0, r.stderr
    manifest, _ = store.verified(f"{s3}/gate", "train_gate")
    assert (
        manifest.inputs["baseline"]["uri"] == f"{s3}/baseline"
        and manifest.inputs["shards"]["uri"] == f"{s3}/shards"
    )
    r = cli("calibrate-scrc", "--baseline", f"{s3}/baseline", "--gate", f"{s3}/gate", "--out", f"{s3}/scrc",
            "scrc.confidence=gate", "scrc.alpha=0.9")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert store.verified(f"{s3}/scrc", "calibrate_scrc")[0].inputs["gate"]["uri"] == f"{s3}/gate"


def test_phase_5_answers_by_the_gates_scores_when_told_to(tmp_path):
    """A gate that knows which decisions are wrong lets calibrate_scrc answer every right one and no wrong one."""
    logits, labels = separable_logits(n=2000, seed=8, noise=1.5)
    p1 = fake_baseline(tmp_path / "p1", logits, labels)
    wrong = (logits[:, 0] >= 0).astype(int) != labels  # the fit part's threshold is near 0.5 here
    oracle = fake_gate(tmp_path / "gate", p1, np.where(wrong, 0.01, 0.99))
    cfg = load_config(calibrate_scrc.Config, [], ["scrc.confidence=gate", "scrc.alpha=0.05"])
    m = calibrate_scrc.run(cfg, baseline=p1, gate=oracle, out=tmp_path / "scrc")
    policy = json.loads((tmp_path / "scrc" / "scrc.json").read_text())
    assert policy["confidence"] == "gate" and policy["lambda"] == pytest.approx(0.99, abs=1e-6)
    assert policy["answered_metrics"]["accuracy"] > 0.95 > 1 - wrong.mean() + 0.1  # wrong ones deferred
    assert policy["coverage"] > policy["margin_coverage"]  # the margin cannot tell the wrong ones apart
    assert m.inputs["gate"]["manifest_sha256"] == input_record(oracle)["manifest_sha256"]


def test_gate_and_confidence_must_agree_and_belong_to_the_same_phase_1(tmp_path):
    logits, labels = separable_logits(n=400, seed=9)
    p1 = fake_baseline(tmp_path / "p1", logits, labels)
    other = fake_baseline(tmp_path / "other", logits[::-1].copy(), labels[::-1].copy())
    gate = fake_gate(tmp_path / "gate", other, np.full(400, 0.5))
    cases = [
        (["--gate", gate], "--gate is read only with scrc.confidence=gate"),
        (["scrc.confidence=gate"], "scrc.confidence=gate needs --gate"),
        (["--gate", gate, "scrc.confidence=gate"], "do not belong together"),
        (["--gate", p1, "scrc.confidence=gate"], "train_gate"),
    ]
    for extra, expect in cases:
        flags, overrides = [a for a in extra if "=" not in str(a)], [a for a in extra if "=" in str(a)]
        r = cli(
            "calibrate-scrc", "--baseline", p1, *flags, "--out", tmp_path / "o", "scrc.alpha=0.3", *overrides
        )
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and expect in r.stderr, (
            extra,
            r.stderr,
        )
        assert not (tmp_path / "o").exists()


def test_calibrate_scrc_with_a_gate_does_not_import_torch(tmp_path):
    logits, labels = separable_logits(n=400, seed=5)
    p1 = fake_baseline(tmp_path / "p1", logits, labels)
    gate = fake_gate(tmp_path / "gate", p1, np.abs(logits[:, 0]) / np.abs(logits).max())
    code = (
        "import sys; from streetvision.cli import main; "
        f"rc = main(['calibrate-scrc', '--baseline', {str(p1)!r}, '--gate', {str(gate)!r}, '--out', "
        f"{str(tmp_path / 'o')!r}, 'scrc.alpha=0.2', 'scrc.confidence=gate']); "
        "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_a_gate_bundle_serves_what_its_held_out_report_says(gated, trained, tmp_path):
    """export ships the gate with checksums; Predictor recomputes the gate on each image and defers
    exactly where the bundle's policy, applied to train_gate's scores, defers."""
    from PIL import Image

    from streetvision.bundle import policy_outputs, verify_bundle
    from streetvision.eval import views
    from streetvision.predict import Predictor

    cfg = load_config(
        calibrate_scrc.Config, [], ["scrc.confidence=gate", "scrc.alpha=0.9", "scrc.views=clean"]
    )
    calibrate_scrc.run(cfg, baseline=trained["baseline"], gate=gated, out=tmp_path / "scrc")
    export_bundle.run(load_config(export_bundle.Config, [], ["export.policy=scrc"]), baseline=trained["baseline"],
                      policy=tmp_path / "scrc", splits=trained["splits"], out=tmp_path / "b")  # fmt: skip
    b = verify_bundle(tmp_path / "b")
    assert b["policy"]["gate"] == {"weights": "gate.safetensors", "config": "gate.json"}
    assert {"gate.safetensors", "gate.json"} <= set(b["files"]) and "selective" in b["test_metrics"]
    predictor = Predictor(tmp_path / "b")
    ids = json.loads((trained["baseline"] / "ids_val_test.json").read_text())
    images = [Image.open(trained["dataset"] / i).convert("RGB") for i in ids]
    served = predictor.decide(images)
    s = views.load(trained["baseline"], "val_test", "clean")
    expected = policy_outputs("scrc", b["policy"]["params"], s.scores, np.load(gated / "gate_val_test.npy"))
    assert np.array_equal(served["decision"], expected["decision"])
    assert np.array_equal(served["answered"], expected["answered"])
    np.testing.assert_allclose(predictor.scores(images)[1], np.load(gated / "gate_val_test.npy"), atol=1e-5)
    # An edited gate is refused like every other file of the bundle.
    (tmp_path / "b" / "gate.json").write_text("{}")
    r = cli("predict", "--bundle", tmp_path / "b", trained["dataset"] / ids[0])
    assert r.returncode == 2 and "gate.json" in r.stderr


@pytest.mark.slow
def test_a_gate_can_learn_on_clean_images_too(trained, tmp_path):
    m = gate_step(trained["baseline"], trained["shards"], tmp_path / "g", "gate.views=clean")
    rows = len(json.loads((trained["splits"] / "splits.json").read_text())["val_select"])
    assert m.metrics["val_select_rows"] == rows  # one row per image, not per view
    assert json.loads((tmp_path / "g" / "model.json").read_text())["views"] == "clean"
