"""calibrate_scrc, ``calibrate_scrc``: the step on train_baseline outputs, its refusals, and that it never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from baseline_fake import fake_baseline, separable_logits

from streetvision.config import load_config
from streetvision.eval import conformal
from streetvision.io.manifests import verify_dir
from streetvision.steps import calibrate_scrc


def cli(*args):
    return subprocess.run([sys.executable, "-m", "streetvision", *args], capture_output=True, text=True)


def step(tmp_path, baseline, *overrides):
    cfg = load_config(calibrate_scrc.Config, [], list(overrides))
    return calibrate_scrc.run(cfg, baseline=baseline, out=tmp_path / "scrc")


@pytest.mark.parametrize("view", ["clean", "challenge"])
def test_commits_a_policy_whose_guarantee_holds_on_its_calibration_part(tmp_path, view):
    logits, labels = separable_logits(n=1200, seed=2, noise=1.2)
    p1 = fake_baseline(tmp_path / "p1", logits, labels)
    m = step(tmp_path, p1, "scrc.alpha=0.08", f"scrc.views={view}")
    verify_dir(tmp_path / "scrc", "calibrate_scrc")
    policy = json.loads((tmp_path / "scrc" / "scrc.json").read_text())
    assert policy["policy_type"] == "scrc" and policy["temperature"] > 0 and 0 < policy["threshold"] < 1
    assert policy["n"] + policy["n_fit"] == 1200 and 0 < policy["coverage"] < 1
    assert (policy["risk_on_calibration"] * policy["n"] + 1) / (policy["n"] + 1) <= 0.08  # the CRC condition
    assert set(policy["calibration"]["after"]) == {"ece", "mce", "nll", "brier"}
    assert m.metrics["coverage"] == policy["coverage"] and m.inputs["baseline"]["manifest_sha256"]
    assert (tmp_path / "scrc" / "risk_coverage.png").read_bytes()[:4] == b"\x89PNG"


def test_high_probability_version_and_fnr(tmp_path):
    logits, labels = separable_logits(n=4000, seed=3, noise=0.8)
    p1 = fake_baseline(tmp_path / "p1", logits, labels)
    step(tmp_path, p1, "scrc.alpha=0.1", "scrc.delta=0.1", "scrc.risk=fnr")
    policy = json.loads((tmp_path / "scrc" / "scrc.json").read_text())
    assert policy["delta"] == 0.1 and policy["risk"] == "fnr" and "Learn then Test" in policy["guarantee"]
    assert policy["risk_on_calibration"] <= 0.1


def test_an_alpha_the_data_cannot_support_is_one_line_and_commits_nothing(tmp_path):
    logits, labels = separable_logits(n=100, seed=4)
    p1 = fake_baseline(tmp_path / "p1", logits, labels)
    r = cli("calibrate-scrc", "--baseline", str(p1), "--out", str(tmp_path / "o"), "scrc.alpha=0.01")
    assert r.returncode == 2 and "needs at least 99 calibration images" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    with pytest.raises(conformal.ConformalError):
        step(tmp_path, p1, "scrc.alpha=0.05", "scrc.delta=0.01")


def test_calibrate_scrc_does_not_import_torch(tmp_path):
    logits, labels = separable_logits(n=400, seed=5)
    p1 = fake_baseline(tmp_path / "p1", logits, labels)
    code = (
        "import sys; from streetvision.cli import main; "
        f"rc = main(['calibrate-scrc', '--baseline', {str(p1)!r}, '--out', {str(tmp_path / 'o')!r}, 'scrc.alpha=0.2']); "
        "assert rc == 0, rc; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert np.isfinite(json.loads((tmp_path / "o" / "scrc.json").read_text())["lambda"])


@pytest.mark.slow
def test_streetvision_run_runs_phase_5_when_named(tmp_path):
    from streetvision.pipeline import run_local

    settings = ["demo.n=160", "demo.size=48", "data.image_size=48", "data.augment=none", "eval.challenge_views=2",
                "trainer.max_epochs=1", "pipeline.phases=[make_splits,pack_shards,train_baseline,calibrate_scrc]",
                "scrc.alpha=0.3"]  # fmt: skip
    summary = run_local(str(tmp_path / "run"), overrides=settings)
    assert (
        summary["steps"]["calibrate_scrc"].startswith("ran") and summary["steps"]["export_bundle"] == "absent"
    )
    verify_dir(tmp_path / "run" / "calibrate_scrc", "calibrate_scrc")
    again = run_local(str(tmp_path / "run"), overrides=settings)
    assert again["steps"]["calibrate_scrc"] == "up to date, skipped"


def test_runs_on_the_object_store(s3, tmp_path):
    from streetvision.io import store

    logits, labels = separable_logits(n=400, seed=6)
    store.upload_dir(fake_baseline(tmp_path / "p1", logits, labels), f"{s3}/p1")
    r = cli("calibrate-scrc", "--baseline", f"{s3}/p1", "--out", f"{s3}/scrc", "scrc.alpha=0.2")
    assert r.returncode == 0, r.stderr
    manifest, _ = store.verified(f"{s3}/scrc", "calibrate_scrc")
    assert manifest.inputs["baseline"]["uri"] == f"{s3}/p1" and 0 < manifest.metrics["coverage"] <= 1
