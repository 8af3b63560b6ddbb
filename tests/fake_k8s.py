"""A Kubernetes API server on 127.0.0.1 for the TrainJob launcher's calls, as strict as a cluster's.

TrainJobs (``trainer.kubeflow.org/v1alpha1``) are created with ``fieldValidation=Strict`` against the
vendored CRD's OpenAPI schema (unknown fields are errors, as the API server's strict decoding makes them),
and with the CRD's CEL rules on the name; an existing name is 409. They can be read and deleted. Pods are
listed by label selector and their logs read. What the cluster's controllers would do (conditions, pods
and logs of a running job) the test does, through :class:`FakeCluster`'s methods, or a ``controller``
callback that runs on every create.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import yaml

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT / "manifests" / "trainer" / "v2.3.0" / "trainer.kubeflow.org_trainjobs.yaml"
JOBS = re.compile(r"^/apis/trainer\.kubeflow\.org/v1alpha1/namespaces/([^/]+)/trainjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods(?:/([^/]+)(/log)?)?$")


def _strict(schema: dict) -> dict:
    """The schema with unknown properties refused wherever the CRD does not preserve them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    return schema


@cache
def validator():
    """A JSON-schema validator of a TrainJob, from the pinned CRD's v1alpha1 OpenAPI schema."""
    from jsonschema import Draft7Validator

    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def schema_errors(job: dict) -> list[str]:
    """Every place ``job`` breaks the schema (strictly), as ``path: message``."""
    return sorted(
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator().iter_errors(job)
    )


def cel_errors(job: dict) -> list[str]:
    """The CRD's CEL rules on the object (the API server evaluates them; a schema check does not)."""
    name = job.get("metadata", {}).get("name", "")
    errors = []
    if not re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name):
        errors.append("metadata.name must match RFC 1035 DNS label format")
    if len(name) > 63:
        errors.append("metadata.name must be no more than 63 characters")
    return errors


class FakeCluster:
    def __init__(self, controller=None):
        self.jobs: dict[tuple[str, str], dict] = {}
        self.pods: dict[tuple[str, str], dict] = {}
        self.logs: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.controller = controller  # called with (cluster, job) after each create
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeCluster:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path, namespace: str = "team") -> Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
        }))  # fmt: skip
        return path

    def api_client(self):
        from kubernetes import client

        config = client.Configuration()
        config.host = self.url
        return client.ApiClient(config)

    # What the controllers would do.
    def set_condition(self, namespace: str, name: str, kind: str, message: str = "") -> None:
        with self.lock:
            job = self.jobs[(namespace, name)]
            job.setdefault("status", {}).setdefault("conditions", []).append(
                {
                    "type": kind,
                    "status": "True",
                    "reason": kind,
                    "message": message,
                    "lastTransitionTime": "2026-12-02T00:00:00Z",
                }  # fmt: skip
            )

    def add_pod(self, namespace: str, job: str, node: int, log: str = "") -> str:
        name = f"{job}-node-0-{node}-{uuid.uuid4().hex[:5]}"
        labels = {"jobset.sigs.k8s.io/jobset-name": job, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                  "batch.kubernetes.io/job-completion-index": str(node)}  # fmt: skip
        with self.lock:
            self.pods[(namespace, name)] = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": namespace, "labels": labels,
                             "creationTimestamp": "2026-12-02T00:00:00Z"},
            }  # fmt: skip
            self.logs[(namespace, name)] = log
        return name

    def append_log(self, namespace: str, pod: str, text: str) -> None:
        with self.lock:
            self.logs[(namespace, pod)] += text

    def creates(self) -> int:
        return sum(1 for method, path in self.requests if method == "POST")

    def deletes(self) -> int:
        return sum(1 for method, path in self.requests if method == "DELETE")


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
            "message": message}  # fmt: skip


def _handler(cluster: FakeCluster):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, code: int, body, content_type: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            url = urlparse(self.path)
            cluster.requests.append(("POST", url.path))
            m = JOBS.match(url.path)
            if not m or m.group(2):
                return self._send(404, _status(404, "NotFound", url.path))
            namespace = m.group(1)
            job = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if parse_qs(url.query).get("fieldValidation") != ["Strict"]:
                return self._send(
                    400, _status(400, "BadRequest", "this cluster requires fieldValidation=Strict")
                )
            if errors := schema_errors(job) + cel_errors(job):
                return self._send(422, _status(422, "Invalid", f"TrainJob is invalid: {'; '.join(errors)}"))
            name = job["metadata"]["name"]
            with cluster.lock:
                if (namespace, name) in cluster.jobs:
                    return self._send(
                        409, _status(409, "AlreadyExists", f'trainjobs "{name}" already exists')
                    )
                job["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()),
                                       creationTimestamp="2026-12-02T00:00:00Z")  # fmt: skip
                cluster.jobs[(namespace, name)] = job
            if cluster.controller is not None:
                cluster.controller(cluster, job)
            self._send(201, job)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            cluster.requests.append(("GET", url.path))
            if m := JOBS.match(url.path):
                with cluster.lock:
                    job = cluster.jobs.get((m.group(1), m.group(2)))
                if job is None:
                    return self._send(404, _status(404, "NotFound", f'trainjobs "{m.group(2)}" not found'))
                return self._send(200, job)
            if m := PODS.match(url.path):
                namespace, name, log = m.groups()
                if name and log:
                    text = cluster.logs.get((namespace, name))
                    if text is None:
                        return self._send(404, _status(404, "NotFound", f'pods "{name}" not found'))
                    return self._send(200, text, "text/plain")
                selector = parse_qs(url.query).get("labelSelector", [""])[0]
                wanted = dict(pair.split("=", 1) for pair in selector.split(",") if pair)
                with cluster.lock:
                    items = [p for (ns, _), p in cluster.pods.items() if ns == namespace
                             and all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())]  # fmt: skip
                return self._send(
                    200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}
                )
            self._send(404, _status(404, "NotFound", url.path))

        def do_DELETE(self) -> None:
            url = urlparse(self.path)
            cluster.requests.append(("DELETE", url.path))
            m = JOBS.match(url.path)
            with cluster.lock:
                job = cluster.jobs.pop((m.group(1), m.group(2)), None) if m else None
            if job is None:
                return self._send(404, _status(404, "NotFound", url.path))
            self._send(200, _status(200, "Success", "deleted") | {"status": "Success"})

    return Handler
