"""A training step as a Kubeflow Trainer v2 TrainJob, created, watched and cleaned up from a pipeline task.

Kubeflow Pipelines v2 has no resource op: the launcher task (base image, the ``kubernetes`` client) creates
a ``trainer.kubeflow.org/v1alpha1`` TrainJob (Kubeflow Trainer v2.3.0; its CRD is vendored in
``manifests/trainer/``) on the admin's ``torch-distributed`` ClusterTrainingRuntime, waits on its
``status.conditions`` (``Complete`` or ``Failed``), copies rank 0's log into its own, and deletes the job
on SIGTERM, cancellation or its deadline. Every TrainJob pod runs ``torchrun -m streetvision <step>``
with the ``PET_*`` variables the runtime sets; rank 0 commits the step's output straight to the output
artifact's URI, which the launcher then verifies on the object store before it writes the executor
output, as the single-pod component does: the rest of the pipeline cannot tell the difference.

The job's name is a function of the Kubeflow run and task, so a retried launcher finds the job it made: a
running or finished one is adopted (409 on create), a failed one is deleted and made again (the training
resumes from its checkpoints). Creates use strict field validation: an unknown field is an error.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from streetvision.errors import StreetVisionError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
TRAINER_VERSION = "v2.3.0"  # the Kubeflow Trainer release whose CRD the jobs are written for (vendored)
RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Kubeflow Trainer installs for PyTorch
NODE_JOB = "node"  # that runtime's replicated job (and container) name
# torchrun's variables, which the torch runtime sets in every pod and its webhook refuses in spec.trainer.env
RESERVED_ENV = frozenset(
    {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
)
MANAGER = "streetvision.io/launcher"  # the runtime patch's owner
NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # the CRD's rule for metadata.name (RFC 1035), <= 63
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")  # an image reference pinned to one image


class LaunchError(StreetVisionError):
    """The TrainJob could not be run to completion."""


@dataclass(frozen=True)
class JobSpec:
    """What the compile options decide about a TrainJob: its shape, resources, image and placement."""

    image: str
    nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0
    gpu_resource: str = "nvidia.com/gpu"
    cpu: str = "4"
    memory: str = "16G"
    ephemeral_storage: str = "10Gi"  # the stream cache and the chunks in flight, on the pod's own disk
    secret: str = "streetvision-s3"  # noqa: S105 - the Secret's name
    secret_keys: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3",
                                    "AWS_DEFAULT_REGION")  # fmt: skip
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, str], ...] = ()
    runtime: str = RUNTIME
    deadline_s: int = 7 * 24 * 3600


def job_name(run_id: str, task: str) -> str:
    """The TrainJob of one Kubeflow run's task: ``sv-<task>-<hash>``, an RFC 1035 label of at most 63
    characters, the same for every retry of that task."""
    digest = hashlib.sha256(f"{run_id}/{task}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", task.lower()).strip("-")[:36].rstrip("-") or "task"
    return f"sv-{slug}-{digest}"


def manifest(name: str, namespace: str, spec: JobSpec, step: str, step_args: list[str],
             labels: dict[str, str]) -> dict:  # fmt: skip
    """The TrainJob that runs ``streetvision <step> <step_args>`` under torchrun on ``spec.nodes`` nodes."""
    requests = {"cpu": spec.cpu, "memory": spec.memory, "ephemeral-storage": spec.ephemeral_storage}
    limits = {"memory": spec.memory}
    if spec.gpus_per_node:
        requests[spec.gpu_resource] = limits[spec.gpu_resource] = str(spec.gpus_per_node)
    env = [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": spec.secret, "key": key}}}
        for key in spec.secret_keys
    ]
    job = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "runtimeRef": {"name": spec.runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "activeDeadlineSeconds": spec.deadline_s,
            "trainer": {
                "image": spec.image,
                "command": ["torchrun", "-m", "streetvision", step],
                "args": list(step_args),
                "env": env,
                "numNodes": spec.nodes,
                "numProcPerNode": spec.procs_per_node,
                "resourcesPerNode": {"requests": requests, "limits": limits},
            },
        },
    }
    if spec.node_selector or spec.tolerations:
        pod = {k: v for k, v in (("nodeSelector", dict(spec.node_selector)),
                                 ("tolerations", [dict(t) for t in spec.tolerations])) if v}  # fmt: skip
        job["spec"]["runtimePatches"] = [{
            "manager": MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                {"name": NODE_JOB, "template": {"spec": {"template": {"spec": pod}}}}
            ]}}},
        }]  # fmt: skip
    return job


def check(job: dict) -> None:
    """The rules the CRD states in CEL and the torch runtime's webhook enforces, which an OpenAPI schema
    check does not run: the name, and no torchrun variable in the trainer's env; and ours: the training
    image by digest, so that every node runs the same one."""
    name = job["metadata"]["name"]
    if len(name) > 63 or not NAME.match(name):
        raise LaunchError(f"TrainJob name {name!r}: an RFC 1035 label of at most 63 characters")
    image = job["spec"]["trainer"]["image"]
    if not DIGEST.search(image):
        raise LaunchError(
            f"TrainJob {name}: image {image} is not pinned by digest (name@sha256:...): each node pulls it, "
            "and a tag can move between the pulls"
        )
    reserved = sorted({e["name"] for e in job["spec"]["trainer"].get("env", [])} & RESERVED_ENV)
    if reserved:
        raise LaunchError(
            f"TrainJob {name}: spec.trainer.env sets {', '.join(reserved)}, which the torch runtime sets"
        )


def conditions(job: dict) -> set[str]:
    """The condition types that are True."""
    return {c["type"] for c in (job.get("status") or {}).get("conditions", []) if c.get("status") == "True"}


class _Stopped(Exception):
    """SIGTERM: the Kubeflow run was cancelled or the launcher's pod is being removed."""


class Launcher:
    """One TrainJob, through the Kubernetes API: create or adopt it, wait on it, delete it."""

    def __init__(self, namespace: str, name: str, api_client=None, poll_s: float = 5.0):
        from kubernetes import client

        self.namespace, self.name, self.poll_s = namespace, name, poll_s
        self.api = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self._printed: dict[str, int] = {}  # pod -> log lines copied

    def create(self, job: dict) -> dict:
        """Create ``job``, or adopt the one a previous attempt of this task made (a failed one is deleted
        and made again, so that a retry trains, resuming from its checkpoints)."""
        from kubernetes.client.exceptions import ApiException

        check(job)
        for _ in range(2):
            try:
                made = self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, job,
                                                               field_validation="Strict")  # fmt: skip
                print(f"trainjob: created {self.namespace}/{self.name}", flush=True)
                return made
            except ApiException as e:
                if e.status != 409:
                    raise LaunchError(
                        f"TrainJob {self.name}: the API refused it ({e.status}: {_reason(e)})"
                    ) from None
            existing = self.get()
            if existing["metadata"].get("labels", {}) != job["metadata"]["labels"]:
                raise LaunchError(f"TrainJob {self.name} exists and is not this task's (other labels)")
            if "Failed" not in conditions(existing):
                print(
                    f"trainjob: adopted {self.namespace}/{self.name}, made by an earlier attempt", flush=True
                )
                return existing
            print(f"trainjob: {self.name} failed in an earlier attempt: deleting it to run again", flush=True)
            self.delete(wait=True)
        raise LaunchError(f"TrainJob {self.name}: could not be made again after deleting the failed one")

    def get(self) -> dict:
        return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name)

    def delete(self, wait: bool = False) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.name,
                                                     propagation_policy="Foreground")  # fmt: skip
        except ApiException as e:
            if e.status != 404:
                raise
        while wait:
            try:
                self.get()
            except ApiException as e:
                if e.status == 404:
                    return
                raise
            time.sleep(self.poll_s)

    def rank0_log(self) -> list[str]:
        """Rank 0's log lines not copied yet (node 0 is the Job's completion index 0)."""
        from kubernetes.client.exceptions import ApiException

        selector = f"jobset.sigs.k8s.io/jobset-name={self.name},batch.kubernetes.io/job-completion-index=0"
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        lines: list[str] = []
        for pod in sorted(pods, key=lambda p: p.metadata.creation_timestamp or 0):
            try:
                text = self.core.read_namespaced_pod_log(pod.metadata.name, self.namespace)
            except ApiException as e:  # a pod not started yet has no log: the next poll tries again
                if e.status not in (400, 404):
                    raise
                continue
            new = text.splitlines()
            done = self._printed.get(pod.metadata.name, 0)
            lines += new[done:]
            self._printed[pod.metadata.name] = len(new)
        return lines

    def wait(self, deadline: float) -> list[str]:
        """Poll until Complete (rank 0's log lines), or raise on Failed and at the deadline."""
        tail: list[str] = []
        while True:
            state = conditions(self.get())
            for line in self.rank0_log():
                print(f"[rank 0] {line}", flush=True)
                tail = (tail + [line])[-50:]
            if "Complete" in state:
                return tail
            if "Failed" in state:
                raise LaunchError(f"TrainJob {self.name} failed: {_last_error(tail, self.failure())}")
            if time.time() > deadline:
                raise LaunchError(f"TrainJob {self.name} ran past its deadline; deleted")
            time.sleep(self.poll_s)

    def failure(self) -> str:
        job = self.get()
        failed = [c for c in (job.get("status") or {}).get("conditions", []) if c["type"] == "Failed"]
        return failed[0].get("message", "") if failed else ""


def _reason(e) -> str:
    import json

    try:
        return json.loads(e.body).get("message", e.reason)
    except (TypeError, ValueError):
        return str(e.reason)


def _last_error(lines: list[str], condition: str) -> str:
    """Rank 0's own one-line error where it wrote one, else its last line, else the job's condition."""
    errors = [line for line in lines if re.match(r"^streetvision [a-z-]+: error: ", line)]
    if errors:
        return errors[-1]
    return (lines[-1] if lines else "") or condition or "no log from rank 0"


def launch(step: str, step_args: list[str], *, spec: JobSpec, namespace: str, run_id: str, task: str,
           out: str, executor_input: str | None, poll_s: float = 5.0, api_client=None) -> None:  # fmt: skip
    """Run ``streetvision <step> <step_args>`` as a TrainJob and wait for it; then verify its commit at
    ``out`` (an ``s3://`` URI) and write the executor output, as the step itself would."""
    from streetvision.io import store
    from streetvision.io.manifests import MANIFEST

    if not store.is_s3(out):
        raise LaunchError(f"--out {out}: a TrainJob's pods commit to the object store; give an s3:// URI")
    if executor_input:
        from streetvision.kfp_executor import parse

        parse(executor_input)
    name = job_name(run_id, task)
    labels = {"app.kubernetes.io/managed-by": "streetvision", "streetvision.io/run-id": run_id[:63],
              "streetvision.io/task": task[:63]}  # fmt: skip
    job = manifest(name, namespace, spec, step, step_args, labels)
    if api_client is None:
        from kubernetes import config

        config.load_config()  # in-cluster: the pod's service account; else $KUBECONFIG
    launcher = Launcher(namespace, name, api_client, poll_s)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        launcher.create(job)
        launcher.wait(time.time() + spec.deadline_s)
    except (_Stopped, LaunchError, KeyboardInterrupt) as e:
        launcher.delete()
        if isinstance(e, _Stopped):
            raise LaunchError(f"TrainJob {name}: stopped (SIGTERM); deleted") from None
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    manifest_ = store.committed_manifest(out, step.replace("-", "_"))
    print(f"trainjob: {name} complete; {out} verified ({len(manifest_.outputs)} files)", flush=True)
    if executor_input:
        from streetvision.kfp_executor import write_executor_output

        with tempfile.TemporaryDirectory(prefix="sv-launch-") as tmp:
            local = Path(tmp) / "out"
            local.mkdir()
            for name_ in (MANIFEST, *(n for n in manifest_.outputs if n.endswith(".md"))):
                store.download_file(store.join(out, name_), local / name_)
            write_executor_output(executor_input, local, manifest_)


def toleration(spec: str) -> dict[str, str]:
    """``KEY[=VALUE][:EFFECT]`` (``--toleration``, of the compiler and of the launcher) as a Toleration."""
    kv, _, effect = spec.partition(":")
    key, _, value = kv.partition("=")
    return {"key": key, "operator": "Equal" if value else "Exists", **({"value": value} if value else {}),
            **({"effect": effect} if effect else {})}  # fmt: skip


def toleration_flag(t: dict[str, str]) -> str:
    """A Toleration as its ``--toleration`` flag: the inverse of :func:`toleration`."""
    return (
        t["key"]
        + (f"={t['value']}" if t.get("value") else "")
        + (f":{t['effect']}" if t.get("effect") else "")
    )


def launch_spec(args) -> JobSpec:
    """The JobSpec of ``launch-trainjob``'s flags."""
    for name, value in (("--nodes", args.nodes), ("--procs-per-node", args.procs_per_node),
                        ("--deadline-s", args.deadline_s)):  # fmt: skip
        if value < 1:
            raise LaunchError(f"{name} {value}: at least 1")
    return JobSpec(image=args.image, nodes=args.nodes, procs_per_node=args.procs_per_node,
                   gpus_per_node=args.gpus_per_node, gpu_resource=args.gpu_resource, cpu=args.cpu,
                   memory=args.memory, ephemeral_storage=args.ephemeral_storage, secret=args.secret,
                   node_selector=dict(s.split("=", 1) for s in args.node_selector), tolerations=tuple(toleration(t) for t in args.toleration),
                   runtime=args.runtime, deadline_s=args.deadline_s)  # fmt: skip


def _on_sigterm(signum, frame):
    raise _Stopped()


def namespace() -> str:
    """The launcher's namespace: ``POD_NAMESPACE`` (the pipeline sets it from the pod's metadata), else
    the service account's."""
    if ns := os.environ.get("POD_NAMESPACE"):
        return ns
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if path.is_file():
        return path.read_text().strip()
    print("trainjob: no POD_NAMESPACE; using 'default'", file=sys.stderr)
    return "default"
