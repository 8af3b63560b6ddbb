"""``export-hf``: a bundle as a hub folder that timm alone reloads, reproducing the bundle's decisions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from streetvision.bundle import verify_bundle
from streetvision.eval.sweep import probabilities
from streetvision.io.manifests import verify_dir

pytestmark = pytest.mark.slow
HOTKEY = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"

# Run in a fresh interpreter with timm and torch alone: what a hub user has.
RELOAD = """
import json, sys, timm, torch
from PIL import Image
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
with torch.no_grad():
    out = [model(transform(Image.open(p).convert("RGB"))[None])[0, 0].item() for p in sys.argv[2:]]
assert not any(m.startswith("streetvision") for m in sys.modules)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def vit_bundle(demo_dataset, demo_splits, demo_pack, tmp_path_factory):
    """A strict-size ViT trained at 224 px (timm builds it with img_size=224), exported as a bundle."""
    from streetvision.config import load_config
    from streetvision.steps import export_bundle, sweep_thresholds, train_baseline

    root = tmp_path_factory.mktemp("vit")
    overrides = ["model.backbone=test_vit", "model.pretrained=false", "model.freeze_backbone=false",
                 "data.image_size=224", "data.batch_size=16", "trainer.max_epochs=1",
                 "trainer.accelerator=cpu", "trainer.devices=1", "eval.challenge_views=1"]  # fmt: skip
    train_baseline.run(load_config(train_baseline.Config, [], overrides), shards=demo_pack, out=root / "p1")
    sweep_thresholds.run(load_config(sweep_thresholds.Config), baseline=root / "p1", out=root / "p2")
    export_bundle.run(load_config(export_bundle.Config), baseline=root / "p1", policy=root / "p2",
                      splits=demo_splits, out=root / "b")  # fmt: skip
    return root


def test_timm_alone_reloads_the_folder_and_reproduces_the_bundle(vit_bundle, demo_dataset, tmp_path):
    bundle = vit_bundle / "b"
    assert verify_bundle(bundle)["model"]["architecture"] == {"img_size": 224}
    out = tmp_path / "hf"
    r = subprocess.run(
        [sys.executable, "-m", "streetvision", "export-hf", "--bundle", str(bundle), "--out", str(out),
         "--submitted-by", HOTKEY, "--version", "1.2.3"], capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    verify_dir(out, "export_hf")
    verified = subprocess.run(
        [sys.executable, "-m", "streetvision", "verify", str(out)], capture_output=True, text=True
    )
    assert verified.returncode == 0 and json.loads(verified.stdout)["step"] == "export_hf", verified.stderr
    card = json.loads((out / "model_card.json").read_text())
    assert set(card) == {"model_name", "description", "version", "submitted_by", "submission_time"}
    assert card["version"] == "1.2.3" and card["submitted_by"] == HOTKEY and card["submission_time"] > 1.7e9
    assert subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True).returncode == 0
    text = (out / "README.md").read_text()
    assert "Held-out evaluation" in text and verify_bundle(bundle)["code_version"] in text

    ids = json.loads((vit_bundle / "p1" / "ids_val_test.json").read_text())
    r = subprocess.run([sys.executable, "-c", RELOAD, str(out), *(str(demo_dataset / i) for i in ids)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    folded = np.array(json.loads(r.stdout))
    p = probabilities(np.load(vit_bundle / "p1" / "logits_val_test.npy"))
    t = verify_bundle(bundle)["policy"]["params"]["threshold"]
    np.testing.assert_array_equal(np.round(1 / (1 + np.exp(-folded))) == 1, p >= t)  # 0.5 is the cut
    np.testing.assert_allclose(1 / (1 + np.exp(-(folded + np.log(t / (1 - t))))), p, atol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--version", "1.0"], "X.Y.Z"),
        (["--submitted-by", "two words"], "hotkey"),
        (["--out", "s3://b/x"], "local"),
    ],
)
def test_bad_options_get_one_line(vit_bundle, tmp_path, args, message):
    base = {"--bundle": str(vit_bundle / "b"), "--out": str(tmp_path / "o"), "--submitted-by": HOTKEY}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    r = subprocess.run([sys.executable, "-m", "streetvision", "export-hf", *sum(base.items(), ())],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_an_output_inside_the_bundle_is_refused_and_leaves_the_bundle_as_it_was(vit_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(vit_bundle / "b", bundle)
    r = subprocess.run([sys.executable, "-m", "streetvision", "export-hf", "--bundle", str(bundle), "--out",
                        str(bundle / "hf"), "--submitted-by", HOTKEY], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "lies inside the input --bundle" in r.stderr, r.stderr
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in (vit_bundle / "b").iterdir())
    assert subprocess.run([sys.executable, "-m", "streetvision", "verify", str(bundle)]).returncode == 0


def test_an_scrc_bundle_is_exported_with_its_temperature_and_threshold_folded_in(
    vit_bundle, demo_dataset, demo_splits, tmp_path
):
    """The scrc policy decides on sigmoid(logit / T) >= t: the folder's output must cut there at 0.5."""
    from streetvision.config import load_config
    from streetvision.steps import calibrate_scrc, export_bundle

    calibrate_scrc.run(load_config(calibrate_scrc.Config, [], ["scrc.alpha=0.9"]), baseline=vit_bundle / "p1",
                       out=tmp_path / "c")  # fmt: skip
    export_bundle.run(load_config(export_bundle.Config, [], ["export.policy=scrc"]), baseline=vit_bundle / "p1",
                      policy=tmp_path / "c", splits=demo_splits, out=tmp_path / "b")  # fmt: skip
    params = verify_bundle(tmp_path / "b")["policy"]["params"]
    r = subprocess.run([sys.executable, "-m", "streetvision", "export-hf", "--bundle", str(tmp_path / "b"),
                        "--out", str(tmp_path / "hf"), "--submitted-by", HOTKEY], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    ids = json.loads((vit_bundle / "p1" / "ids_val_test.json").read_text())
    r = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "hf"), *(str(demo_dataset / i) for i in ids)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    folded = np.array(json.loads(r.stdout))
    logits = np.load(vit_bundle / "p1" / "logits_val_test.npy")[:, 0]
    calibrated = 1 / (1 + np.exp(-logits / params["temperature"]))
    assert params["temperature"] != pytest.approx(1.0, abs=1e-3)  # a fold that ignored T would show
    np.testing.assert_array_equal(folded >= 0, calibrated >= params["threshold"])
    t = params["threshold"]
    np.testing.assert_allclose(1 / (1 + np.exp(-(folded + np.log(t / (1 - t))))), calibrated, atol=1e-5)
