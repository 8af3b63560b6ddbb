"""The StreetVision pipeline, built from the phase declaration (``streetvision/phases.py``).

Which optional phases run is chosen when the pipeline is compiled, not by runtime conditions: a
:class:`Variant` (``explora``, ``policy``, ``confidence``: the switches ``streetvision run`` reads as
``pipeline.explora``, ``export.policy`` and ``scrc.confidence``) selects the phases exactly as a local
run does (:func:`streetvision.pipeline.plan`), and each selected phase is one task, its inputs wired to
the outputs the declaration names and its parameters bound to the pipeline parameters whose local
setting reaches it (:data:`streetvision.phases.PARAMETERS`). So each real task appears once in a compiled
file, with no branch a reviewer has to follow, and every shipped variant is its own file
(:data:`VARIANTS`). Runtime branches (``dsl.If``) would copy the tasks after a branch point into every
branch, and ``dsl.OneOf`` does not run on Kubeflow's local runner, which the image tests use.

``build_pipeline(options, variant)`` returns the pipeline function; :class:`PlatformOptions` holds what is
decided at compile time about the cluster (credentials Secret, GPU request, node selector, tolerations,
CPU and memory).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

from kfp import dsl, kubernetes
from kfp.dsl import placeholders

from components.dataset_fingerprint import dataset_fingerprint
from pipelines.trainjob import TrainJobOptions, as_trainjob
from streetvision.phases import BY_STEM, PARAMETERS, SWITCHES, producers
from streetvision.pipeline import plan, reach

PYTHON_TYPES = {"String": str, "Integer": int, "Float": float, "Boolean": bool}


@dataclass(frozen=True)
class PlatformOptions:
    # Secret with the object-store credentials, exposed to the steps as the standard AWS variables.
    s3_secret: str = "streetvision-s3"  # noqa: S105 - the Secret's name, not a secret
    s3_secret_keys: dict[str, str] = field(
        default_factory=lambda: {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL_S3": "AWS_ENDPOINT_URL_S3",
            "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
        }
    )
    gpus: int = 0  # GPUs requested by the training step
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=dict)  # for the training step
    tolerations: list[dict[str, str]] = field(default_factory=list)  # {key, operator, value, effect}
    # Requests per pod; memory limits equal the requests (a pod that outgrows them is told so plainly
    # instead of starving its node) and CPU is not limited (a CPU limit only throttles).
    # Where a step's temporary folder lives (its stream cache, its packing window): "" an emptyDir with
    # the phase's size as its limit; a StorageClass name ("default": the cluster's) a generic ephemeral
    # volume, a per-pod claim of that size the scheduler and the provisioner honour.
    scratch_class: str = ""
    # --trainjob NODESxGPUS: the training phases run as Kubeflow Trainer TrainJobs, each task a launcher.
    trainjob: TrainJobOptions | None = None
    train_cpu: str = "4"
    train_memory: str = "16G"
    step_cpu: str = "1"
    step_memory: str = "2G"


@dataclass(frozen=True)
class Variant:
    """The compile-time switches: adapt_explora first, the policy shipped, what calibrate_scrc answers by."""

    explora: bool = False
    policy: str = "threshold"  # threshold (sweep_thresholds) or scrc (calibrate_scrc)
    confidence: str = "margin"  # scrc: margin, or gate (train_gate first)

    def settings(self) -> list[str]:
        values = {"explora": str(self.explora).lower(), "policy": self.policy, "confidence": self.confidence}
        return [f"{setting}={values[name]}" for name, setting in SWITCHES.items()]

    @property
    def name(self) -> str:
        parts = (
            ["explora"] * self.explora
            + ["scrc"] * (self.policy == "scrc")
            + ["gate"] * (self.confidence == "gate")
        )
        return "-".join(["streetvision", *parts])


# The variants compiled into pipelines/<name>.yaml (train_gate only answers for calibrate_scrc: gate implies scrc).
VARIANTS = {
    v.name: v
    for v in (
        Variant(),
        Variant(policy="scrc"),
        Variant(policy="scrc", confidence="gate"),
        Variant(explora=True),
    )
}


def component(stem: str):
    """The container component of a phase: ``components/<stem>.py``'s function of that name."""
    return getattr(importlib.import_module(f"components.{stem}"), stem)


def passes(comp) -> dict[str, str]:
    """The setting each of a component's parameters is passed as (``trainer.max_epochs``, or a flag such
    as ``--checkpoint-root``) -> the parameter, read from its command line."""
    args = comp.component_spec.implementation.container.args
    found = {}
    for i, arg in enumerate(args):
        if isinstance(arg, placeholders.ConcatPlaceholder):
            key, value = arg.items
            if isinstance(key, str) and isinstance(value, placeholders.InputValuePlaceholder):
                found[key.rstrip("=")] = value.input_name
        elif isinstance(arg, placeholders.InputValuePlaceholder) and isinstance(args[i - 1], str):
            found[args[i - 1]] = arg.input_name
    return found


@dataclass
class Plan:
    """What a variant compiles to: its phases, each one's inputs and constant settings, and the pipeline
    parameters with the (phase, component parameter) each one binds."""

    phases: list[str]
    inputs: dict[str, dict[str, str | None]]
    constants: dict[str, dict[str, str]]
    parameters: dict[str, list[tuple[str, str]]]


def compile_plan(variant: Variant) -> Plan:
    phases, configs, routed = plan(variant.settings())
    if variant.confidence == "gate" and variant.policy != "scrc":
        raise ValueError("confidence=gate answers for calibrate_scrc: it needs policy=scrc")
    given = {"explora"} if variant.explora else set()
    inputs = {stem: producers(stem, configs[stem], given) for stem in phases}
    constants: dict[str, dict[str, str]] = {}
    for stem in phases:  # a switch a component passes on (export.policy) is a constant of its variant
        keys = passes(component(stem))
        switches = {entry.split("=", 1)[0]: entry.split("=", 1)[1] for entry in routed[stem]}
        constants[stem] = {keys[k]: v for k, v in switches.items() if k in keys}
    parameters: dict[str, list[tuple[str, str]]] = {}
    for name, parameter in PARAMETERS.items():
        for stem, key in sorted(reach(parameter.setting)):
            if stem not in phases:
                continue
            keys = passes(component(stem))
            if key not in keys:
                raise ValueError(
                    f"pipeline parameter {name} sets {stem}'s {key} (as streetvision run's "
                    f"{parameter.setting} does), but components/{stem}.py does not pass {key}"
                )
            parameters.setdefault(name, []).append((stem, keys[key]))
    for name, targets in parameters.items():  # one setting, one default: the steps' own
        defaults = {repr(component(s).component_spec.inputs[arg].default) for s, arg in targets}
        if len(defaults) > 1:
            raise ValueError(
                f"pipeline parameter {name}: its phases' components default to {sorted(defaults)}"
            )
    return Plan(phases, inputs, constants, parameters)


def _signature(p: Plan) -> tuple[inspect.Signature, str]:
    """The pipeline function's signature (types and defaults: the components', i.e. the steps') and its
    docstring (the declaration's descriptions), which KFP publishes."""
    params = [inspect.Parameter("dataset_uri", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str)]
    doc = ["Args:", "    dataset_uri: Object-store URI of the dataset folder (labels.csv + images), "
           "e.g. s3://bucket/roadwork."]  # fmt: skip
    for name, targets in p.parameters.items():
        stem, input_name = targets[0]
        spec = component(stem).component_spec.inputs[input_name]
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        annotation=PYTHON_TYPES[spec.type], default=spec.default))  # fmt: skip
        doc.append(f"    {name}: {PARAMETERS[name].help}")
    return inspect.Signature(params), "\n".join(doc)


SCRATCH = "/scratch"  # the emptyDir of a step with a scratch size: its TMPDIR


def _with_resources(task, cpu: str, memory: str):
    return task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)


def _with_credentials(task, options: PlatformOptions):
    return kubernetes.use_secret_as_env(
        task,
        secret_name=options.s3_secret,
        secret_key_to_env={k: v for k, v in options.s3_secret_keys.items()},
    )


def _on_training_nodes(task, options: PlatformOptions):
    _with_resources(task, options.train_cpu, options.train_memory)
    if options.gpus:
        task.set_accelerator_type(options.gpu_resource).set_accelerator_limit(options.gpus)
    for key, value in options.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in options.tolerations:
        kubernetes.add_toleration(
            task,
            key=t.get("key"),
            operator=t.get("operator", "Equal"),
            value=t.get("value"),
            effect=t.get("effect"),
        )
    return task


def build_pipeline(options: PlatformOptions | None = None, variant: Variant | None = None):
    options, variant = options or PlatformOptions(), variant or Variant()
    p = compile_plan(variant)
    signature, args_doc = _signature(p)

    def make(stem: str, phase, **kwargs):
        """The phase's task: its component, or with --trainjob a training phase's launcher of it."""
        if options.trainjob is not None and phase.checkpoints:
            task = as_trainjob(component(stem), phase.artifact, options.trainjob)(**kwargs)
            kubernetes.use_field_path_as_env(task, "POD_NAMESPACE", "metadata.namespace")
            _with_credentials(task, options)  # it verifies the commit on the object store
            return _with_resources(task, options.step_cpu, options.step_memory)
        return place(component(stem)(**kwargs), phase)

    def place(task, phase=None):
        """Credentials for every step; a training step gets GPU, placement and bigger requests; a step
        that streams or packs gets an emptyDir of its scratch size as its temporary folder."""
        _with_credentials(task, options)
        if phase is not None and phase.scratch:
            if options.scratch_class:
                kubernetes.add_ephemeral_volume(
                    task, volume_name="scratch", mount_path=SCRATCH, access_modes=["ReadWriteOnce"],
                    size=phase.scratch, storage_class_name=None if options.scratch_class == "default" else options.scratch_class,
                )  # fmt: skip
            else:
                kubernetes.empty_dir_mount(
                    task, volume_name="scratch", mount_path=SCRATCH, size_limit=phase.scratch
                )
            task.set_env_variable("TMPDIR", SCRATCH)
        if phase is not None and phase.gpu:
            return _on_training_nodes(task, options)
        if phase is not None and phase.image == "train":
            return _with_resources(task, options.train_cpu, options.train_memory)
        return _with_resources(task, options.step_cpu, options.step_memory)

    def pipeline(*channels):
        values = dict(zip(signature.parameters, channels, strict=True))
        # The dataset goes by its URI (phases read it in place; an artifact would be copied into every pod
        # that reads it). A rewritten dataset keeps its URI: a never-cached fingerprint of its listing feeds
        # make_splits, so the cache key of every step follows the content.
        fingerprint = place(dataset_fingerprint(dataset_uri=values["dataset_uri"]))
        fingerprint.set_caching_options(False)
        fingerprint.set_display_name("dataset-fingerprint")
        made, uris = {}, {None: values["dataset_uri"]}  # phase -> its artifact; its URI, where streamed
        for stem in p.phases:
            phase = BY_STEM[stem]
            kwargs = dict(
                (f"{name}_uri", uris[producer]) if phase.by_uri(name) else (name, made[producer])
                for name, producer in p.inputs[stem].items()
            )
            if stem == "make_splits":
                kwargs["dataset_fingerprint"] = fingerprint.outputs["fingerprint"]
            kwargs.update(p.constants[stem])
            kwargs.update({arg: values[name] for name, targets in p.parameters.items()
                           for s, arg in targets if s == stem})  # fmt: skip
            task = make(stem, phase, **kwargs)
            if phase.checkpoints:
                # Only training is retried: a preempted GPU node is worth another try, and it resumes
                # from its checkpoints. Bad input and the release gate fail the same way every time (exit
                # 2, checked before any work), and transient object-store errors are already retried inside
                # each step by botocore.
                task.set_retry(num_retries=1, backoff_duration="10s")
            made[stem] = task.outputs[phase.artifact]
            if phase.streamed:
                uris[stem] = task.outputs[f"{phase.artifact}_uri"]

    pipeline.__signature__ = signature
    pipeline.__doc__ = f"StreetVision pipeline: {' -> '.join(p.phases)}.\n\n{args_doc}\n"
    return dsl.pipeline(
        name=variant.name,
        description="Train, calibrate and export the StreetVision roadwork classifier: "
        + " -> ".join(p.phases)
        + ".",
    )(pipeline)


streetvision = build_pipeline()
