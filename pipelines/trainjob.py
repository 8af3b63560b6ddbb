"""The ``--trainjob NODESxGPUS`` form of a training component: the same interface, a launcher inside.

:func:`as_trainjob` takes a phase's container component and returns one with the same name, inputs and
outputs whose container (the base image) runs ``streetvision launch-trainjob``: it creates the Kubeflow
Trainer TrainJob that runs the step under torchrun on the training image, waits for it and writes the
executor output, so the tasks after it cannot tell the difference. The TrainJob's pods have no Kubeflow
launcher to copy artifacts in or out, so the step reads its artifact inputs and writes its output by
URI; the output is committed at the artifact's URI, which the next task downloads as usual.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from kfp import dsl
from kfp.dsl import placeholders

from components.images import BASE_IMAGE, ENTRYPOINT, TRAIN_IMAGE
from streetvision.trainjob import JobSpec, toleration_flag

# The arguments a step component passes that the launcher takes for itself (KFP_RUN, and the output).
_OWN = {"--executor-input", "--run-id", "--task", "--out"}


@dataclass(frozen=True)
class TrainJobOptions:
    """``--trainjob NODESxGPUS`` and what goes with it: the TrainJob's shape and its pods' resources and
    placement (the compile options), and how long it may run."""

    nodes: int
    gpus_per_node: int
    gpu_resource: str = JobSpec.gpu_resource
    cpu: str = JobSpec.cpu
    memory: str = JobSpec.memory
    ephemeral_storage: str = JobSpec.ephemeral_storage
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    secret: str = JobSpec.secret
    deadline_s: int = JobSpec.deadline_s

    @classmethod
    def parse(cls, shape: str, **kwargs) -> TrainJobOptions:
        """``2x4``: two nodes of four GPUs each (``2x0``: CPU nodes, one process each)."""
        nodes, _, gpus = shape.lower().partition("x")
        if not (nodes.isdigit() and gpus.isdigit() and int(nodes) >= 1):
            raise ValueError(f"--trainjob {shape}: NODESxGPUS, e.g. 2x4 (2 nodes, 4 GPUs each) or 2x0 (CPU)")
        return cls(int(nodes), int(gpus), **kwargs)

    def flags(self, image: str) -> list[str]:
        """The launcher's flags for these options."""
        flags = ["--image", image, "--nodes", str(self.nodes), "--procs-per-node", str(max(1, self.gpus_per_node)),
                 "--gpus-per-node", str(self.gpus_per_node), "--gpu-resource", self.gpu_resource, "--cpu", self.cpu,
                 "--memory", self.memory, "--ephemeral-storage", self.ephemeral_storage, "--secret", self.secret,
                 "--deadline-s", str(self.deadline_s)]  # fmt: skip
        for key, value in self.node_selector.items():
            flags += ["--node-selector", f"{key}={value}"]
        for t in self.tolerations:
            flags += ["--toleration", toleration_flag(t)]
        return flags


def _by_uri(arg):
    """A step argument as a TrainJob pod can use it: artifact paths (the launcher's mounts) as URIs."""
    if isinstance(arg, placeholders.InputPathPlaceholder):
        return placeholders.InputUriPlaceholder(arg.input_name)
    if isinstance(arg, placeholders.IfPresentPlaceholder):

        def each(part):
            return [_by_uri(a) for a in part] if isinstance(part, list) else _by_uri(part)

        return placeholders.IfPresentPlaceholder(
            input_name=arg.input_name,
            then=each(arg.then),
            else_=None if arg.else_ is None else each(arg.else_),
        )
    return arg


def as_trainjob(comp, artifact: str, options: TrainJobOptions):
    """``comp`` (a training phase's component) with its container replaced by the TrainJob launcher."""
    launched = copy.deepcopy(comp)
    container = launched.component_spec.implementation.container
    step, args = container.command[-1], list(container.args)
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if isinstance(arg, str) and arg in _OWN:
            skip = True
            continue
        kept.append(_by_uri(arg))
    container.image = BASE_IMAGE
    container.command = [*ENTRYPOINT, "launch-trainjob"]
    container.args = [
        "--step", step,
        "--out", placeholders.OutputUriPlaceholder(artifact),
        "--executor-input", dsl.PIPELINE_TASK_EXECUTOR_INPUT_PLACEHOLDER,
        "--run-id", dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        "--task", dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
        *options.flags(TRAIN_IMAGE),
        "--",
        *kept,
    ]  # fmt: skip
    spec = launched.component_spec
    spec.description = (spec.description or "") + (
        f"\n\nLaunched as a Kubeflow Trainer TrainJob on {options.nodes} node(s) x {max(1, options.gpus_per_node)} "
        "process(es) (streetvision launch-trainjob); the step commits to its output artifact's URI."
    )
    return launched
