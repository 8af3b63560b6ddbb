"""The container images for real: build (in CI), `docker run` of each phase, and the whole compiled
pipeline in containers through Kubeflow's own local executor (kfp.local.DockerRunner).

Skipped with a reason where no Docker engine answers (a laptop without Docker); CI starts one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.images import BASE_IMAGE, TRAIN_IMAGE
from streetvision.data.demo import write_demo_dataset
from streetvision.io import store
from streetvision.io.manifests import verify_dir
from streetvision.verify import verify_path

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parent.parent
HOST = ["--network", "host"]  # the CI engine runs without a bridge network


def docker(*args, **kw):
    return subprocess.run(["docker", *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def images():
    if shutil.which("docker") is None or docker("info").returncode != 0:
        pytest.skip("no Docker engine answers here (CI installs and starts one; see .ci/run)")
    missing = [i for i in (BASE_IMAGE, TRAIN_IMAGE) if docker("image", "inspect", i).returncode != 0]
    if missing:
        r = subprocess.run(["make", "images"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"make images failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return {"base": BASE_IMAGE, "train": TRAIN_IMAGE}


@pytest.fixture
def shared(tmp_path):
    """A folder the containers' non-root user can write to."""
    tmp_path.chmod(0o777)
    return tmp_path


def run_in(image, shared, *args, env=None):
    flags = ["--rm", *HOST, "-v", f"{shared}:{shared}"]
    for k, v in (env or {}).items():
        flags += ["-e", f"{k}={v}"]
    return docker("run", *flags, image, *args)


@pytest.mark.parametrize("which", ["base", "train"])
def test_docker_run_image_help_shows_the_cli(images, which):
    r = docker("run", "--rm", *HOST, images[which], "--help")
    assert r.returncode == 0, r.stderr
    assert "make-splits" in r.stdout and "train-baseline" in r.stdout


@pytest.mark.parametrize("which", ["base", "train"])
def test_images_run_as_a_non_root_numeric_user(images, which):
    r = docker("run", "--rm", *HOST, "--entrypoint", "id", images[which], "-u")
    assert r.returncode == 0 and r.stdout.strip() not in ("", "0")


def test_base_image_has_no_torch_and_train_image_has_the_stack(images):
    code = "import importlib.util as u; print([m for m in ('torch','timm','lightning') if u.find_spec(m)])"
    base = docker("run", "--rm", *HOST, "--entrypoint", "python", images["base"], "-c", code)
    train = docker("run", "--rm", *HOST, "--entrypoint", "python", images["train"], "-c", code)
    assert base.stdout.strip() == "[]" and train.stdout.strip() == "['torch', 'timm', 'lightning']"


def test_base_image_stays_under_500_mb(images):
    size = int(docker("image", "inspect", "--format", "{{.Size}}", images["base"]).stdout)
    print(f"base image {size / 1e6:.0f} MB")
    assert size < 500e6


def test_a_phase_runs_with_docker_run_on_a_mounted_folder(images, shared):
    data = write_demo_dataset(shared / "data", n=40, seed=1, size=48)
    os.chmod(data, 0o777)
    r = run_in(images["base"], shared, "make-splits", "--dataset", str(data), "--out", str(shared / "splits"))
    assert r.returncode == 0, r.stderr
    m = verify_dir(shared / "splits")
    revision = docker(
        "image",
        "inspect",
        "--format",
        '{{index .Config.Labels "org.opencontainers.image.revision"}}',
        images["base"],
    ).stdout.strip()
    assert len(revision) == 40 and m.code_version == revision, (
        "manifests record the commit the image was built from"
    )


def test_bad_input_in_a_container_is_one_clear_line(images, shared):
    r = run_in(
        images["base"], shared, "make-splits", "--dataset", str(shared / "nope"), "--out", str(shared / "o")
    )
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not a directory" in r.stderr


def test_a_phase_runs_against_s3_with_the_aws_variables(images, s3, s3_server, shared):
    data = write_demo_dataset(shared / "data", n=40, seed=2, size=48)
    store.upload_tree(data, f"{s3}/data")
    r = run_in(
        images["base"],
        shared,
        "make-splits",
        "--dataset",
        f"{s3}/data",
        "--out",
        f"{s3}/splits",
        env=s3_server.env(),
    )
    assert r.returncode == 0, r.stderr
    store.verified(f"{s3}/splits", "make_splits")
    assert s3_server.secret_key not in r.stdout + r.stderr


@pytest.mark.slow
def test_the_compiled_pipeline_runs_end_to_end_in_containers(images, shared):
    from kfp import local

    from pipelines.streetvision import streetvision

    root = shared / "pipeline_root"
    root.mkdir()
    root.chmod(0o777)
    data = write_demo_dataset(root / "dataset", n=80, seed=3, size=64)
    old = os.umask(0)  # kfp.local creates task folders on the host; the containers' user must write them
    try:
        # The runner passes command + args as the container command: clear the image's ENTRYPOINT as
        # Kubernetes does when a pod sets `command`.
        local.init(runner=local.DockerRunner(network_mode="host", entrypoint=[""]), pipeline_root=str(root))
        streetvision(
            dataset_uri=str(data),
            backbone="test_efficientnet",
            pretrained=False,
            freeze_backbone=False,
            epochs=2,
            batch_size=16,
            image_size=64,
        )
    finally:
        os.umask(old)
    (run_dir,) = [p for p in root.iterdir() if p.name.startswith("streetvision-")]
    for task, artifact in [
        ("make-splits", "splits"),
        ("train-baseline", "model"),
        ("sweep-thresholds", "thresholds"),
        ("export-bundle", "bundle"),
    ]:
        verify_dir(run_dir / task / artifact)
    report = verify_path(str(run_dir / "export-bundle" / "bundle"))
    assert report["bundle_files"] == 4
    bundle = json.loads((run_dir / "export-bundle" / "bundle" / "bundle.json").read_text())
    assert bundle["backbone"] == "test_efficientnet" and "mcc" in bundle["test_metrics"]
    predict = subprocess.run(
        [
            sys.executable,
            "-m",
            "streetvision",
            "predict",
            "--bundle",
            str(run_dir / "export-bundle" / "bundle"),
            str(data / "images"),
        ],
        capture_output=True,
        text=True,
    )
    assert predict.returncode == 0 and len(predict.stdout.splitlines()) == 80
