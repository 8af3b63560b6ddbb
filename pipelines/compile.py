"""``python -m pipelines.compile``: write pipelines/<variant>.yaml and components/<stem>.yaml.

Every shipped variant (``pipelines.streetvision.VARIANTS``: ``streetvision``, ``streetvision-scrc``,
``streetvision-scrc-gate``, ``streetvision-explora``) is its own committed file; ``--variant NAME`` with
an ``--output`` compiles one.

Platform options (off by default): ``--gpus N``, ``--node-selector key=value``, ``--toleration
key=value:effect``, ``--s3-secret NAME``, ``--scratch-class STORAGECLASS``, ``--train-cpu``/``--train-memory``/``--step-cpu``/``--step-memory``
(requests; memory limits equal them), ``--trainjob NODESxGPUS`` (the training phases as Kubeflow Trainer
TrainJobs: ``pipelines/trainjob.py``), ``--legacy-platform-spec`` (for KFP backends older than the SDK).
Image references come from components/images.py (environment overrides ``STREETVISION_REGISTRY``,
``STREETVISION_TAG``, or digests in ``STREETVISION_BASE_IMAGE`` / ``STREETVISION_TRAIN_IMAGE``).

The committed files are only ever the defaults: with any option or other images the pipeline goes to
``--output`` (default ``build/<variant>.yaml``) and the components beside it, never over them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kfp import compiler

from components import images
from components.dataset_fingerprint import dataset_fingerprint
from pipelines.streetvision import VARIANTS, PlatformOptions, build_pipeline, component
from pipelines.trainjob import TrainJobOptions
from streetvision.phases import PHASES
from streetvision.trainjob import DIGEST, toleration

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = ROOT / "pipelines"
COMMITTED = PIPELINES / "streetvision.yaml"
BUILD = ROOT / "build" / "streetvision.yaml"
# Each phase's component, and the fingerprint helper that feeds make_splits on Kubeflow.
COMPONENTS = {"dataset_fingerprint": dataset_fingerprint, **{p.stem: component(p.stem) for p in PHASES}}


def compile_all(
    pipeline_path: Path,
    components_dir: Path | None,
    options: PlatformOptions | None = None,
    variant: str = "streetvision",
) -> None:
    compiler.Compiler().compile(
        build_pipeline(options or PlatformOptions(), VARIANTS[variant]), str(pipeline_path)
    )
    if components_dir is not None:
        for stem, comp in COMPONENTS.items():
            compiler.Compiler().compile(comp, str(components_dir / f"{stem}.yaml"))


# What a KFP backend older than the SDK's knows of the Kubernetes platform spec (kfp-kubernetes 1.x): newer
# fields (e.g. SecretAsEnv's ``secretNameParameter`` and ``optional``) make its driver fail with "unknown
# field". Per platform-spec section, the fields kept by --legacy-platform-spec.
LEGACY_FIELDS = {
    "secretAsEnv": {"secretName", "keyToEnv"},
    "nodeSelector": {"labels"},
    "tolerations": {"key", "operator", "value", "effect", "tolerationSeconds"},
    "emptyDirMounts": {"volumeName", "mountPath", "medium", "sizeLimit"},  # since kfp-kubernetes 1.3
}


def legacy_platform_spec(path: Path) -> None:
    """Rewrite the compiled pipeline's Kubernetes platform spec in the form older backends accept."""
    import yaml

    docs = list(yaml.safe_load_all(path.read_text()))
    for doc in docs[1:]:
        executors = (
            doc.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
        )
        for config in executors.values():
            unknown = set(config) - set(LEGACY_FIELDS)
            if unknown:
                raise SystemExit(f"--legacy-platform-spec: no legacy form for {', '.join(sorted(unknown))}")
            for section, keep in LEGACY_FIELDS.items():
                value = config.get(section)
                entries = value if isinstance(value, list) else [value] if value else []
                for entry in entries:
                    for key in set(entry) - keep:
                        del entry[key]
    path.write_text(yaml.safe_dump_all(docs, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=None, help=f"default: {COMMITTED} (defaults) or {BUILD}")
    p.add_argument("--components-dir", type=Path, default=None)
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]")
    p.add_argument("--s3-secret", default=PlatformOptions().s3_secret)
    p.add_argument("--scratch-class", default="", metavar="STORAGECLASS",
                   help="the steps' temporary folders on generic ephemeral volumes of this class ('default': "
                   "the cluster's), a storage request the scheduler honours; default: size-limited emptyDirs")  # fmt: skip
    d = PlatformOptions()
    for name in ("train_cpu", "train_memory", "step_cpu", "step_memory"):
        p.add_argument(
            f"--{name.replace('_', '-')}", default=getattr(d, name), help=f"default {getattr(d, name)}"
        )
    p.add_argument("--legacy-platform-spec", action="store_true", help="for KFP backends older than 2.17")
    p.add_argument("--trainjob", default=None, metavar="NODESxGPUS",
                   help="run train_baseline and adapt_explora as Kubeflow Trainer TrainJobs of NODES nodes with "
                   "GPUS GPUs each (2x4; 2x0: CPU nodes), each launched by a small task on the base image")  # fmt: skip
    p.add_argument("--trainjob-deadline-s", type=int, default=None, help="a TrainJob's activeDeadlineSeconds")
    p.add_argument("--variant", choices=sorted(VARIANTS), default=None,
                   help="compile this variant alone (default: every shipped variant into pipelines/)")  # fmt: skip
    a = p.parse_args(argv)
    tolerations = [toleration(t) for t in a.toleration]
    node_selector = dict(s.split("=", 1) for s in a.node_selector)
    trainjob = None
    if a.trainjob:
        try:
            trainjob = TrainJobOptions.parse(
                a.trainjob, cpu=a.train_cpu, memory=a.train_memory, node_selector=node_selector,
                tolerations=tolerations, secret=a.s3_secret,
                **({"deadline_s": a.trainjob_deadline_s} if a.trainjob_deadline_s else {}),
            )  # fmt: skip
        except ValueError as e:
            p.error(str(e))
        if not DIGEST.search(images.TRAIN_IMAGE):
            p.error(f"--trainjob: the training image {images.TRAIN_IMAGE} is a tag; every node of a TrainJob "
                    "pulls it, so give it by digest (TRAIN_REF=<image>@sha256:..., as `make push` prints it)")  # fmt: skip
    options = PlatformOptions(
        s3_secret=a.s3_secret,
        scratch_class=a.scratch_class,
        gpus=a.gpus,
        node_selector=node_selector,
        tolerations=tolerations,
        trainjob=trainjob,
        train_cpu=a.train_cpu,
        train_memory=a.train_memory,
        step_cpu=a.step_cpu,
        step_memory=a.step_memory,
    )
    default = options == PlatformOptions() and not a.legacy_platform_spec and images.DEFAULT
    if default and a.output is None and a.variant is None:  # the committed files: every shipped variant
        for name in VARIANTS:
            compile_all(PIPELINES / f"{name}.yaml", ROOT / "components" if name == "streetvision" else None,
                        variant=name)  # fmt: skip
        print(
            f"wrote {', '.join(f'pipelines/{n}.yaml' for n in VARIANTS)} and {len(COMPONENTS)} component specs"
        )
        return 0
    variant = a.variant or "streetvision"
    output = a.output or (PIPELINES / f"{variant}.yaml" if default else BUILD.with_name(f"{variant}.yaml"))
    if not default and output.resolve().parent == PIPELINES.resolve():
        p.error("pipelines/*.yaml hold the defaults only; write these options to another --output")
    components = a.components_dir or (
        ROOT / "components"
        if output.resolve().parent == PIPELINES.resolve()
        else output.parent / "components"
    )
    if not default and components.resolve() == (ROOT / "components").resolve():
        p.error("components/*.yaml hold the default images only; give another --components-dir")
    output.parent.mkdir(parents=True, exist_ok=True)
    components.mkdir(parents=True, exist_ok=True)
    compile_all(output, components, options, variant)
    if a.legacy_platform_spec:
        legacy_platform_spec(output)
    print(f"wrote {output} and {len(COMPONENTS)} component specs in {components}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
