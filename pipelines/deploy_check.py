"""``python -m pipelines.deploy_check``: check a kustomization against the compiled pipeline before applying.

Renders the overlay with ``kubectl kustomize`` (offline) and reads the compiled pipeline, then checks
that they belong together:

- every Secret key the pipeline's steps read exists in the Secret of that name;
- the service account runs use exists, and a RoleBinding gives it a Role that may read that Secret and
  the ``kfp-launcher`` ConfigMap, and, for a ``--trainjob`` pipeline, create, watch and delete TrainJobs
  and read pods and their logs;
- the ``kfp-launcher`` ConfigMap has an ``s3://`` pipeline root, and its S3 endpoint and the steps'
  ``AWS_ENDPOINT_URL_S3`` name the same host and port; where that host is an in-cluster Service, the render
  holds that Service with that port in that namespace; the launcher's credentials Secret has its keys.

Prints every mismatch (exit 1) or one line saying what was checked (exit 0).
"""

from __future__ import annotations

import argparse
import base64
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import yaml

ROOT = Path(__file__).resolve().parent.parent


def render(overlay: Path) -> list[dict]:
    r = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"deploy-check: kubectl kustomize {overlay} failed: {r.stderr.strip()}")
    return [o for o in yaml.safe_load_all(r.stdout) if o]


def secret_reads(package: Path) -> dict[str, set[str]]:
    """Secret name -> the keys the compiled pipeline's steps read from it."""
    docs = list(yaml.safe_load_all(package.read_text()))
    reads: dict[str, set[str]] = {}
    for doc in docs[1:]:
        executors = (
            doc.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
        )
        for config in executors.values():
            for entry in config.get("secretAsEnv", []):
                reads.setdefault(entry["secretName"], set()).update(k["secretKey"] for k in entry["keyToEnv"])
    return reads


# What a --trainjob pipeline's launcher does through the Kubernetes API (streetvision/trainjob.py).
LAUNCHER_NEEDS = (
    ("trainer.kubeflow.org", "trainjobs", ("create", "get", "list", "watch", "delete")),
    ("", "pods", ("get", "list", "watch")),
    ("", "pods/log", ("get",)),
)


def launches_trainjobs(package: Path) -> bool:
    """Whether a task of the compiled pipeline runs the TrainJob launcher."""
    docs = list(yaml.safe_load_all(package.read_text()))
    executors = docs[0].get("deploymentSpec", {}).get("executors", {})
    return any("launch-trainjob" in e.get("container", {}).get("command", []) for e in executors.values())


def _secret_data(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return data | dict(secret.get("stringData") or {})


def _host_port(endpoint: str, default_port: int) -> tuple[str, int]:
    url = urlparse(endpoint if "://" in endpoint else f"//{endpoint}")
    return (url.hostname or "", url.port or default_port)


def check(objects: list[dict], package: Path, service_account: str) -> list[str]:
    problems: list[str] = []
    find = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    namespaces = {o["metadata"].get("namespace") for o in objects}
    if len(namespaces) != 1:  # one namespace, or none (applied with -n)
        problems.append(f"objects are not all in one namespace: {sorted(map(str, namespaces))}")
    namespace = next(iter(namespaces))

    for name, keys in secret_reads(package).items():
        secret = find.get(("Secret", name))
        if secret is None:
            problems.append(f"the pipeline's steps read Secret {name!r}, which the manifests do not define")
        elif missing := keys - set(_secret_data(secret)):
            problems.append(f"Secret {name!r} lacks key(s) the steps read: {', '.join(sorted(missing))}")

    if ("ServiceAccount", service_account) not in find:
        problems.append(f"no ServiceAccount {service_account!r} (the one `make submit` runs as)")
    bound = [
        b["roleRef"]["name"]
        for b in objects
        if b["kind"] == "RoleBinding"
        and any(s.get("kind") == "ServiceAccount" and s.get("name") == service_account for s in b["subjects"])
    ]
    rules = [r for name in bound for r in (find.get(("Role", name)) or {}).get("rules", [])]

    def may_get(resource: str, name: str) -> bool:
        return any(
            resource in r.get("resources", []) and "get" in r.get("verbs", [])
            and (not r.get("resourceNames") or name in r["resourceNames"])
            for r in rules
        )  # fmt: skip

    for resource, name in [("configmaps", "kfp-launcher"), *(("secrets", s) for s in secret_reads(package))]:
        if not may_get(resource, name):
            problems.append(f"ServiceAccount {service_account!r} may not get {resource}/{name}")
    if launches_trainjobs(package):
        for group, resource, verbs in LAUNCHER_NEEDS:
            granted = {v for r in rules if group in r.get("apiGroups", []) and resource in r.get("resources", [])
                       and not r.get("resourceNames") for v in r.get("verbs", [])}  # fmt: skip
            if missing := [] if "*" in granted else sorted(set(verbs) - granted):
                problems.append(f"ServiceAccount {service_account!r} may not {', '.join(missing)} {resource} "
                                f"({group or 'core'}): the TrainJob launcher needs it")  # fmt: skip

    launcher = find.get(("ConfigMap", "kfp-launcher"))
    if launcher is None:
        return [*problems, "no ConfigMap kfp-launcher: the launcher would not know the artifact root"]
    root = launcher["data"].get("defaultPipelineRoot", "")
    if not root.startswith("s3://"):
        problems.append(f"kfp-launcher defaultPipelineRoot {root!r} is not an s3:// URI")
    s3 = (yaml.safe_load(launcher["data"].get("providers", "")) or {}).get("s3", {}).get("default", {})
    port = 80 if s3.get("disableSSL") else 443
    launcher_at = _host_port(s3.get("endpoint", ""), port)
    ref = s3.get("credentials", {}).get("secretRef", {})
    ref_secret = find.get(("Secret", ref.get("secretName", "")))
    if ref_secret is None:
        problems.append(f"kfp-launcher's credentials Secret {ref.get('secretName')!r} is not defined")
    elif missing := {ref.get("accessKeyKey"), ref.get("secretKeyKey")} - set(_secret_data(ref_secret)):
        problems.append(f"kfp-launcher's credentials Secret lacks {', '.join(sorted(map(str, missing)))}")
    for name in secret_reads(package):
        endpoint = _secret_data(find.get(("Secret", name)) or {}).get("AWS_ENDPOINT_URL_S3")
        if endpoint and _host_port(endpoint, 443 if endpoint.startswith("https") else 80) != launcher_at:
            problems.append(
                f"the steps reach the object store at {endpoint} but the launcher at {s3.get('endpoint')}: "
                "artifacts and step outputs would land in different stores"
            )
    host, port = launcher_at
    if host.endswith(".svc.cluster.local") or host.count(".") == 1:
        service, svc_ns = host.split(".")[:2]
        svc = find.get(("Service", service))
        if svc is None or svc_ns != (namespace or svc_ns):
            problems.append(
                f"the object store {host} is no Service of these manifests (namespace {namespace})"
            )
        elif port not in {p["port"] for p in svc["spec"]["ports"]}:
            problems.append(f"Service {service!r} does not expose port {port}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--overlay", type=Path, default=ROOT / "manifests" / "overlays" / "example")
    p.add_argument("--package", type=Path, default=ROOT / "pipelines" / "streetvision.yaml")
    p.add_argument("--service-account", default="streetvision-pipeline-runner")
    a = p.parse_args(argv)
    objects = render(a.overlay)
    problems = check(objects, a.package, a.service_account)
    for line in problems:
        print(f"deploy-check: {line}", file=sys.stderr)
    if not problems:
        print(
            f"deploy-check: {a.overlay} and {a.package} fit together ({len(objects)} objects; Secret keys, "
            f"ServiceAccount {a.service_account}, launcher and object store checked)"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
