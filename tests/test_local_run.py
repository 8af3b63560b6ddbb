"""`streetvision run`: the default pipeline on one machine, resumable, re-running only what changed."""

import json
import subprocess
import sys

import pytest
from conftest import TINY_TRAIN

from streetvision.config import ConfigError
from streetvision.errors import StreetVisionError
from streetvision.io import store
from streetvision.io.manifests import MANIFEST, verify_dir
from streetvision.pipeline import route, run_local
from streetvision.verify import verify_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(demo_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    summary = run_local(str(out), dataset=str(demo_dataset), overrides=TINY_TRAIN)
    return out, summary


def manifests(out):
    return {
        s: (out / s / MANIFEST).read_bytes()
        for s in ("make_splits", "train_baseline", "sweep_thresholds", "export_bundle")
    }


def test_first_run_commits_every_phase_and_a_verified_bundle(first_run):
    out, summary = first_run
    assert all(state.startswith("ran") for state in summary["steps"].values())
    assert verify_path(str(out / "export_bundle"))["bundle_files"] == 4
    assert "val_test (held out) MCC" in summary["text"] and "verified bundle" in summary["text"]
    runs = {verify_dir(out / s).run_id for s in summary["steps"]}
    assert len(runs) == 1  # one run id across the phases


def test_rerun_with_the_same_inputs_skips_every_phase(first_run, demo_dataset):
    out, _ = first_run
    before = manifests(out)
    summary = run_local(str(out), dataset=str(demo_dataset), overrides=TINY_TRAIN)
    assert set(summary["steps"].values()) == {"up to date, skipped"}
    assert manifests(out) == before


def test_changed_policy_reruns_that_phase_and_downstream_only(first_run, demo_dataset, tmp_path):
    out, _ = first_run
    before = manifests(out)
    summary = run_local(str(out), dataset=str(demo_dataset), overrides=[*TINY_TRAIN, "sweep.max_fnr=0.5"])
    assert summary["steps"]["make_splits"] == summary["steps"]["train_baseline"] == "up to date, skipped"
    assert summary["steps"]["sweep_thresholds"].startswith("ran")
    assert summary["steps"]["export_bundle"].startswith("ran")
    after = manifests(out)
    assert (
        after["train_baseline"] == before["train_baseline"]
        and after["export_bundle"] != before["export_bundle"]
    )


def test_a_phase_that_crashed_before_its_manifest_is_rerun(first_run, demo_dataset):
    out, _ = first_run
    # What a kill before the commit leaves: a staging folder without a manifest, and no output folder.
    (out / "train_baseline" / MANIFEST).unlink()
    (out / "train_baseline").rename(out / ".train_baseline.staging-killed")
    summary = run_local(str(out), dataset=str(demo_dataset), overrides=[*TINY_TRAIN, "sweep.max_fnr=0.5"])
    assert not (out / ".train_baseline.staging-killed").exists()  # the next writer cleans it
    assert summary["steps"]["make_splits"] == "up to date, skipped"
    assert all(
        summary["steps"][s].startswith("ran") for s in ("train_baseline", "sweep_thresholds", "export_bundle")
    )


def test_a_subset_of_phases_runs_when_its_inputs_exist(first_run, demo_dataset):
    out, _ = first_run
    summary = run_local(
        str(out),
        dataset=str(demo_dataset),
        overrides=[*TINY_TRAIN, "sweep.max_fnr=0.3", "pipeline.phases=[sweep_thresholds,export_bundle]"],
    )
    assert summary["steps"]["train_baseline"] == "not selected"
    assert summary["steps"]["sweep_thresholds"].startswith("ran")


def test_a_subset_without_its_inputs_fails_clearly(demo_dataset, tmp_path):
    with pytest.raises(Exception, match="needs a committed baseline"):
        run_local(
            str(tmp_path / "empty"),
            dataset=str(demo_dataset),
            overrides=["pipeline.phases=[sweep_thresholds]"],
        )


def test_overrides_are_routed_to_the_step_that_owns_them_and_shared_settings_to_every_phase():
    routed = route(
        [],
        [
            "model.lr=0.1",
            "splits.seed=2",
            "sweep.max_fnr=0.2",
            "export.min_test_mcc=0.1",
            "seed=4",
            "views=clean",
            "demo.n=50",
            "train_baseline.data.batch_size=8",
        ],
    )
    # seed reaches the splits and every seeded phase; a phase's own spelling wins there.
    assert routed["train_baseline"] == ["seed=4", "model.lr=0.1", "data.batch_size=8"]
    assert routed["make_splits"] == ["splits.seed=4", "splits.seed=2"] and routed["runner"] == ["demo.n=50"]
    assert routed["calibrate_scrc"] == ["scrc.seed=4", "scrc.views=clean"]
    assert routed["sweep_thresholds"] == ["sweep.views=clean", "sweep.max_fnr=0.2"]
    assert routed["adapt_explora"] == ["seed=4"] and routed["train_gate"] == ["seed=4", "gate.views=clean"]
    with pytest.raises(ConfigError, match="modle"):
        route([], ["modle.lr=0.1"])
    # train_baseline trains the backbone adapt_explora adapted: one backbone for both, never one phase's own.
    with pytest.raises(
        ConfigError, match="model.backbone is one setting for adapt_explora and train_baseline"
    ):
        route([], ["train_baseline.model.backbone=test_vit"])


def test_the_settings_choose_the_phases_as_kubeflow_does(tmp_path, demo_dataset):
    from streetvision.pipeline import run_local

    # export.policy=scrc runs calibrate_scrc, not the sweep, and refuses before any work when its input is missing.
    with pytest.raises(Exception, match="needs a committed baseline"):
        run_local(str(tmp_path / "r"), dataset=str(demo_dataset),
                  overrides=["export.policy=scrc", "pipeline.phases=[calibrate_scrc,export_bundle]"])  # fmt: skip
    assert not (tmp_path / "r").exists()


def streetvision_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "streetvision", *args], capture_output=True, text=True, cwd=cwd
    )


def test_whole_run_against_the_s3_server(s3, demo_dataset, tmp_path):
    r = streetvision_cli("demo-data", "--out", f"{s3}/demo", "--n", "16", "--size", "32", cwd=tmp_path)
    assert r.returncode == 0 and "labels.csv" in store.list_files(f"{s3}/demo"), r.stderr
    store.upload_tree(demo_dataset, f"{s3}/data")
    run = ["run", "--out", f"{s3}/run", "--dataset", f"{s3}/data", *TINY_TRAIN]
    # Two runs of the same pipeline to one place at once: each step's prefix is taken by one writer; the
    # other run stops at the first step it finds held, in one line naming the holder.
    both = [
        subprocess.Popen([sys.executable, "-m", "streetvision", *run], cwd=tmp_path, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]  # fmt: skip
    results = [(p.wait(timeout=600), *p.communicate()) for p in both]
    assert list(tmp_path.iterdir()) == [], "an s3:// path must never become a local folder"
    assert sorted(code for code, _, _ in results) == [0, 2], [err[-2000:] for _, _, err in results]
    (_, _, err), *_ = [r for r in results if r[0] == 2]
    assert err.count("\n") == 1 and "being written by run" in err and "Traceback" not in err
    for stem in ("make_splits", "train_baseline", "sweep_thresholds", "export_bundle"):
        manifest, _ = store.verified(f"{s3}/run/{stem}", stem)
        assert store.LOCK not in store.list_files(f"{s3}/run/{stem}")
        assert set(store.list_files(f"{s3}/run/{stem}")) == {*manifest.outputs, MANIFEST}
    assert json.loads(streetvision_cli("verify", f"{s3}/run/export_bundle").stdout)["ok"]
    again = streetvision_cli(*run)
    assert again.returncode == 0 and again.stdout.count("up to date, skipped") == 5


def test_the_embedded_default_learns_the_demo_data_and_a_constant_guess_cannot(tmp_path):
    """`make run` with no arguments: demo data, the tiny CNN, a held-out MCC clearly above 0.5."""
    from streetvision.eval.metrics import compute_mcc

    summary = run_local(str(tmp_path / "run"))
    assert summary["test"]["test_mcc"] > 0.5, summary["text"]
    # The defaults train on the validator's views: what is served on them does no worse than the raw
    # probability cut at 0.5, and the summary says both.
    test = summary["test"]
    assert test["challenge_subnet_reward"] >= test["challenge_raw_subnet_reward"], summary["text"]
    assert "challenge views: " in summary["text"] and "(raw probability cut at 0.5: " in summary["text"]
    assert verify_path(summary["bundle"])["bundle_files"] == 4
    labels = json.loads((tmp_path / "run" / "make_splits" / "splits.json").read_text())["counts"]
    assert labels["val_test"]["positive"] not in (0, labels["val_test"]["total"])
    import numpy as np

    y = np.load(tmp_path / "run" / "train_baseline" / "labels_val_test.npy")
    assert compute_mcc(y, np.ones_like(y)) == compute_mcc(y, np.zeros_like(y)) == 0.0


def test_demo_data_on_s3_is_uploaded_once_with_its_marker_last(s3, monkeypatch):
    from streetvision.data import demo as demo_module
    from streetvision.pipeline import DemoConfig, _demo_data

    settings = DemoConfig(n=24, seed=3, size=32)
    calls = []
    real = demo_module.write_demo_dataset
    monkeypatch.setattr(demo_module, "write_demo_dataset", lambda *a, **k: calls.append(k) or real(*a, **k))
    uploaded = []
    real_upload = store.upload_tree
    monkeypatch.setattr(
        store,
        "upload_tree",
        lambda local, uri, **k: (
            uploaded.append(store.exists(f"{uri}/demo.json")) or real_upload(local, uri, **k)
        ),
    )
    uri = _demo_data(f"{s3}/run", settings)
    assert uri == f"{s3}/run/data" and calls == [{"n": 24, "seed": 3, "size": 32, "domain": "street"}]
    assert uploaded == [False], "the marker must not exist while the images are uploaded"
    files = store.list_files(uri)
    assert "labels.csv" in files and "demo.json" in files and sum(f.endswith(".jpg") for f in files) == 24
    assert json.loads(store.read_bytes(f"{uri}/demo.json")) == {"n": 24, "seed": 3, "size": 32}

    assert _demo_data(f"{s3}/run", settings) == uri and len(calls) == 1  # reused, not regenerated
    _demo_data(f"{s3}/run", DemoConfig(n=30, seed=3, size=32))  # other settings: generated anew
    assert len(calls) == 2 and json.loads(store.read_bytes(f"{uri}/demo.json"))["n"] == 30


def test_demo_data_cut_short_before_its_marker_is_generated_again(tmp_path):
    from streetvision.data.dataset import load_index
    from streetvision.pipeline import DemoConfig, _demo_data

    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    (data / "labels.csv").write_text("image,label\nmissing.jpg,1\n")  # a generation that died early
    uri = _demo_data(str(tmp_path / "run"), DemoConfig(n=24, seed=3, size=32))
    assert len(load_index(uri).ids) == 24 and (data / "demo.json").is_file()


def test_a_rerun_notices_changed_image_content_and_a_tampered_commit_and_says_why(
    demo_dataset, tmp_path, capsys
):
    data = tmp_path / "data"
    import shutil

    shutil.copytree(demo_dataset, data)
    out = tmp_path / "out"
    run_local(str(out), dataset=str(data), overrides=TINY_TRAIN)
    capsys.readouterr()
    image = sorted((data / "images").iterdir())[0]
    from PIL import Image

    Image.new("RGB", (64, 64), (255, 0, 0)).save(image, "JPEG")  # same name, same labels.csv, new pixels
    summary = run_local(str(out), dataset=str(data), overrides=TINY_TRAIN)
    assert all(state.startswith("ran") for state in summary["steps"].values()), summary["steps"]
    assert "== make_splits" in (printed := capsys.readouterr().out) and "input dataset changed" in printed
    model = out / "train_baseline" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-1] + bytes([model.read_bytes()[-1] ^ 1]))
    capsys.readouterr()
    summary = run_local(str(out), dataset=str(data), overrides=TINY_TRAIN)
    printed = capsys.readouterr().out
    assert summary["steps"]["make_splits"] == "up to date, skipped"
    assert "train_baseline" in printed and "failed verification" in printed and "model.safetensors" in printed
    image.unlink()
    with pytest.raises(StreetVisionError, match="missing file"):
        run_local(str(out), dataset=str(data), overrides=TINY_TRAIN)
