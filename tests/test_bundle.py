"""export_bundle: export, verification (tampering, escaping paths, portability) and prediction."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from baseline_fake import reseal

from streetvision.bundle import BundleError, served_probability, verify_bundle
from streetvision.config import load_config
from streetvision.errors import StreetVisionError
from streetvision.eval.sweep import probabilities
from streetvision.io import store
from streetvision.io.manifests import MANIFEST, input_record
from streetvision.io.outputs import StepOutputs
from streetvision.steps import export_bundle

pytestmark = pytest.mark.slow


def cli(*args):
    return subprocess.run([sys.executable, "-m", "streetvision", *args], capture_output=True, text=True)


def export(trained, out, *overrides, policy=None):
    cfg = load_config(export_bundle.Config, [], list(overrides))
    return export_bundle.run(
        cfg,
        baseline=trained["baseline"],
        policy=policy or trained["policy"],
        splits=trained["splits"],
        out=out,
    )


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "export_bundle"
    export(trained, out)
    return out


def test_bundle_carries_relative_paths_checksums_lineage_and_held_out_metrics(bundle, trained):
    b = verify_bundle(bundle)
    assert set(b["files"]) == {"model.safetensors", "model.json", "thresholds.json", "splits.json"}
    assert all(not n.startswith("/") and ".." not in n for n in b["files"])
    assert b["policy"]["type"] == "threshold" and 0 < b["policy"]["params"]["threshold"] < 1
    assert b["backbone"] == "test_efficientnet" and b["class_names"] == ["no_roadwork", "roadwork"]
    assert b["lineage"]["dataset"]["index_sha256"] and b["lineage"]["baseline"]["manifest_sha256"]
    labels = np.load(trained["baseline"] / "labels_val_test.npy")
    views = np.load(trained["baseline"] / "views_val_test_challenge.npy")
    assert b["test_metrics"]["split"] == "val_test" and b["test_metrics"]["views"] == "challenge"
    assert b["test_metrics"]["n"] == len(views) == 4 * len(labels) and b["test_metrics"]["images"] == len(
        labels
    )
    held = b["held_out"]
    assert held["clean"]["metrics"]["n"] == len(labels) and all(
        b["test_metrics"][k] == v for k, v in held["challenge"]["metrics"].items()
    )
    assert set(held["challenge"]["by_level"]) == {"level_0", "level_1", "level_2", "level_3"}
    assert sum(m["tp"] + m["tn"] + m["fp"] + m["fn"] for m in held["challenge"]["by_level"].values()) == len(
        views
    )
    for view in ("clean", "challenge"):
        assert 0 <= held[view]["reward"]["served"]["reward"] <= 1
    assert "| challenge |" in (bundle / "report.md").read_text()
    r = cli("verify", str(bundle))
    assert r.returncode == 0, r.stderr


def test_predictions_from_the_bundle_equal_the_models_own_logits_through_the_policy(bundle, trained):
    ids = json.loads((trained["baseline"] / "ids_val_test.json").read_text())
    expected = probabilities(np.load(trained["baseline"] / "logits_val_test.npy"))
    threshold = verify_bundle(bundle)["policy"]["params"]["threshold"]
    paths = [str(trained["dataset"] / i) for i in ids]
    r = cli("predict", "--bundle", str(bundle), "--served-probability", *paths)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["id"] for row in rows] == paths
    got = np.array([row["probability"] for row in rows])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    for row, p in zip(rows, expected, strict=True):
        assert row["decision"] == ("roadwork" if p >= threshold else "no_roadwork")
        assert (np.round(row["served_probability"]) == 1) == (row["decision"] == "roadwork")


def test_unreadable_images_are_reported_without_stopping_the_batch(bundle, trained, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    good = sorted((trained["dataset"] / "images").iterdir())[0]
    r = cli("predict", "--bundle", str(bundle), str(tmp_path / "broken.jpg"), str(good))
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 1 and "error" in rows[0] and rows[1]["decision"] in ("roadwork", "no_roadwork")


def test_served_probability_is_monotone_and_np_round_reads_the_policys_decision():
    rng = np.random.default_rng(0)
    for t in (0.0, 0.07, 0.1, 0.37, 0.5, 0.9, 1.0, *rng.random(20)):
        ps = np.sort(
            np.r_[np.linspace(0, 1, 101), rng.random(500), t, np.nextafter(t, 0), np.nextafter(t, 1)]
        )
        ps = ps[(ps >= 0) & (ps <= 1)]
        served = served_probability(ps, t)
        assert np.all(np.diff(served) >= 0) and served.min() >= 0 and served.max() <= 1
        np.testing.assert_array_equal(np.round(served) == 1, ps >= t)  # the validator's cut
        assert served_probability(t, t) > 0.5 and isinstance(served_probability(t, t), float)
        assert served[-1] == 1.0


def tampered_copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


@pytest.mark.parametrize("name", ["model.safetensors", "model.json", "thresholds.json", "splits.json"])
def test_flipping_one_byte_in_any_bundled_file_is_named(bundle, tmp_path, name):
    b = tampered_copy(bundle, tmp_path)
    data = bytearray((b / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / name).write_bytes(bytes(data))
    with pytest.raises(StreetVisionError, match=f"{name}: sha256 differs"):
        verify_bundle(b)


def test_truncated_and_deleted_files_are_named(bundle, tmp_path):
    b = tampered_copy(bundle, tmp_path)
    (b / "model.json").write_bytes((b / "model.json").read_bytes()[:-3])
    with pytest.raises(StreetVisionError, match="model.json: size"):
        verify_bundle(b)
    (b / "splits.json").unlink()
    shutil.copy(bundle / "model.json", b / "model.json")
    with pytest.raises(StreetVisionError, match="splits.json: missing"):
        verify_bundle(b)


def edit_bundle_json(b, edit):
    data = json.loads((b / "bundle.json").read_text())
    edit(data)
    (b / "bundle.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "path,message",
    [
        ("../model.safetensors", "'..' component"),
        ("/etc/passwd", "absolute path"),
        ("sub/../../x", "'..' component"),
    ],
)
def test_paths_leaving_the_bundle_are_rejected(bundle, tmp_path, path, message):
    b = tampered_copy(bundle, tmp_path)
    entry = {"sha256": "0" * 64, "size": 1}
    edit_bundle_json(b, lambda d: d["files"].__setitem__(path, entry))
    reseal(b)  # even with a manifest that agrees, bundle.json may not name a path outside the bundle
    with pytest.raises(BundleError, match=message):
        verify_bundle(b)
    r = cli("verify", str(b))
    assert r.returncode != 0 and path in r.stderr


def test_symlink_leaving_the_bundle_is_rejected(bundle, tmp_path):
    b = tampered_copy(bundle, tmp_path)
    outside = tmp_path / "outside.json"
    shutil.copy(b / "model.json", outside)
    (b / "model.json").unlink()
    (b / "model.json").symlink_to(outside)
    with pytest.raises(StreetVisionError, match="model.json: model.json is a symbolic link"):
        verify_bundle(b)


def test_a_copied_bundle_still_verifies_and_predicts(bundle, trained, tmp_path):
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(bundle, moved)
    assert verify_bundle(moved)["files"] == verify_bundle(bundle)["files"]
    image = sorted((trained["dataset"] / "images").iterdir())[0]
    r = cli("predict", "--bundle", str(moved), str(image))
    assert r.returncode == 0, r.stderr


def test_bundle_round_trips_through_the_s3_server(s3, bundle, trained, tmp_path):
    store.upload_dir(bundle, f"{s3}/bundle")
    r = cli("verify", f"{s3}/bundle")
    assert r.returncode == 0, r.stderr
    store.download_dir(f"{s3}/bundle", tmp_path / "down")
    verify_bundle(tmp_path / "down")
    image = sorted((trained["dataset"] / "images").iterdir())[0]
    assert cli("predict", "--bundle", f"{s3}/bundle", str(image)).returncode == 0


def policy_dir(tmp_path, trained, files, step="sweep_thresholds"):
    out = StepOutputs(tmp_path / "policy", step)
    for name, content in files.items():
        out.write_json(name, content)
    out.commit(config={}, inputs={"baseline": input_record(trained["baseline"])})
    return tmp_path / "policy"


@pytest.mark.parametrize(
    "files,message",
    [
        ({"notes.json": {}}, "no thresholds.json; export.policy=threshold needs the sweep_thresholds output"),
        (
            {"thresholds.json": {"policy_type": "magic", "threshold": 0.5}},
            "policy_type 'magic' is not 'threshold'",
        ),
        (
            {"thresholds.json": {"policy_type": "threshold", "threshold": 1.5}},
            "threshold must be a number in",
        ),
    ],
)
def test_a_missing_mistyped_or_out_of_range_policy_fails_clearly(trained, tmp_path, files, message):
    with pytest.raises(BundleError, match=message):
        export(trained, tmp_path / "out", policy=policy_dir(tmp_path, trained, files))
    assert not (tmp_path / "out" / MANIFEST).exists()


SCRC = {"policy_type": "scrc", "threshold": 0.5, "temperature": 2.0, "lambda": 0.3, "alpha": 0.1, "delta": None,
        "risk": "error", "views": "challenge", "confidence": "margin"}  # fmt: skip


def test_an_scrc_bundle_defers_below_lambda_and_reports_selective_metrics(trained, tmp_path):
    policy = policy_dir(tmp_path, trained, {"scrc.json": SCRC}, step="calibrate_scrc")
    with pytest.raises(StreetVisionError, match="a 'sweep_thresholds' commit is expected"):
        export(trained, tmp_path / "wrong", policy=policy)  # export.policy names the one policy to ship
    export(trained, tmp_path / "b", "export.policy=scrc", policy=policy)
    b = verify_bundle(tmp_path / "b")
    assert b["policy"]["type"] == "scrc" and b["policy"]["params"]["lambda"] == 0.3
    sel = b["test_metrics"]["selective"]
    assert (
        0 <= sel["coverage"] <= 1
        and sel["alpha"] == 0.1
        and {"selective_risk", "fnr_answered", "realised_risk"} <= set(sel)
    )
    ids = json.loads((trained["baseline"] / "ids_val_test.json").read_text())
    raw = probabilities(np.load(trained["baseline"] / "logits_val_test.npy"))
    calibrated = 1 / (1 + np.exp(-np.log(raw / (1 - raw)) / 2.0))
    r = cli("predict", "--bundle", str(tmp_path / "b"), *(str(trained["dataset"] / i) for i in ids))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    for row, p in zip(rows, calibrated, strict=True):
        assert row["probability"] == pytest.approx(p, abs=1e-5)
        confident = abs(2 * row["served_probability"] - 1) >= 0.3
        assert row["decision"] == (("roadwork" if p >= 0.5 else "no_roadwork") if confident else "defer")
        assert (np.round(row["served_probability"]) == 1) == (p >= 0.5)  # an answer for every image too
    bad = json.loads((tmp_path / "b" / "bundle.json").read_text())
    bad["policy"]["params"]["lambda"] = 0.0  # answer everything: must not pass as the calibrated policy
    (tmp_path / "b" / "bundle.json").write_text(json.dumps(bad))
    reseal(tmp_path / "b")
    with pytest.raises(BundleError, match="lambda in bundle.json differs"):
        verify_bundle(tmp_path / "b")


def test_release_gate_refuses_a_weak_model_with_the_numbers(trained, tmp_path):
    r = cli(
        "export-bundle",
        "--baseline",
        str(trained["baseline"]),
        "--policy",
        str(trained["policy"]),
        "--splits",
        str(trained["splits"]),
        "--out",
        str(tmp_path / "out"),
        "export.min_test_mcc=1.0",
    )
    assert r.returncode != 0 and "release gate" in r.stderr and "min_test_mcc 1.0" in r.stderr
    assert not (tmp_path / "out" / MANIFEST).exists() and not (tmp_path / "out" / "bundle.json").exists()


def test_export_and_verify_do_not_import_torch(trained, tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys; from streetvision.cli import main;"
        f"assert main(['export-bundle', '--baseline', {str(trained['baseline'])!r}, '--policy', "
        f"{str(trained['policy'])!r}, '--splits', {str(trained['splits'])!r}, '--out', {str(out)!r}]) == 0;"
        f"assert main(['verify', {str(out)!r}]) == 0;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
