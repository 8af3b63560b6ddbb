"""Command line: ``python -m streetvision <step> [--flags] [key=value ...]``.

The only module that parses arguments. Step modules are imported only when their subcommand runs, so
``--help``, ``verify`` and the torch-free phases never import torch. Bad input exits non-zero with one line on
stderr; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from streetvision import __version__
from streetvision.errors import StreetVisionError
from streetvision.phases import PHASES

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line like every other bad input."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser, *, step: bool = True) -> None:
    p.add_argument("--config", action="append", default=[], metavar="YAML", help="config file (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.lr=0.001")
    if not step:
        return
    p.add_argument(
        "--executor-input",
        default=None,
        metavar="JSON",
        help="KFP executor input ({{$}}); the step then writes the executor output for the Kubeflow UI",
    )
    p.add_argument("--run-id", default=None, help="run id recorded in the manifest (Kubeflow: the run's id)")
    p.add_argument("--task", default="", help="task name recorded in the manifest (Kubeflow: the task's)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="streetvision",
        description="StreetVision: crash-safe training, calibration and export of a roadwork classifier.",
    )
    parser.add_argument("--version", action="version", version=f"streetvision {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("demo-data", help="generate the deterministic demo dataset (JPEGs + labels.csv)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=240, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--domain", choices=["street", "shifted"], default="street",
                   help="shifted: other colours, larger objects, a striped texture (another domain)")  # fmt: skip

    p = sub.add_parser("fingerprint", help="a dataset's current fingerprint (Kubeflow's cache key)")
    p.add_argument("--dataset", required=True, help="dataset folder or s3:// prefix holding labels.csv")
    p.add_argument("--output-file", default=None, help="also write it to this file (a KFP output)")

    for phase in PHASES:  # one command per phase, its input flags from the registry
        p = sub.add_parser(phase.command, help=phase.help)
        for name in phase.inputs:
            optional = name in phase.optional_inputs
            p.add_argument(f"--{name}", required=not optional, default=None, help=phase.input_help.get(name))
        p.add_argument("--out", required=True)
        if phase.checkpoints:
            p.add_argument(
                "--checkpoint-root",
                default="",
                metavar="DIR_OR_S3",
                help=f"checkpoint under DIR_OR_S3/<--run-id>/{phase.command} (how a Kubeflow retry finds them)",
            )
        _common(p)

    from streetvision.trainjob import JobSpec  # no third-party import: the client is loaded by launch()

    p = sub.add_parser(
        "launch-trainjob", help="run a training step as a Kubeflow Trainer TrainJob and wait for it"
    )
    p.add_argument("--step", required=True, choices=[ph.command for ph in PHASES if ph.checkpoints],
                   help="the training step its pods run under torchrun")  # fmt: skip
    p.add_argument("--out", required=True, help="the s3:// URI rank 0 commits the step to")
    p.add_argument("--image", required=True, help="the training image, by digest")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--procs-per-node", type=int, default=1, help="torchrun processes per node (one per GPU)")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--gpu-resource", default=JobSpec.gpu_resource)
    p.add_argument("--cpu", default=JobSpec.cpu, help="CPU request per node")
    p.add_argument("--memory", default=JobSpec.memory, help="memory request and limit per node")
    p.add_argument(
        "--ephemeral-storage",
        default=JobSpec.ephemeral_storage,
        help="local disk per node (the stream cache)",
    )
    p.add_argument("--secret", default=JobSpec.secret, help="the object-store Secret, as the AWS_* variables")
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]")
    p.add_argument("--runtime", default=JobSpec.runtime, help="the ClusterTrainingRuntime")
    p.add_argument(
        "--deadline-s", type=int, default=JobSpec.deadline_s, help="the TrainJob's activeDeadlineSeconds"
    )
    p.add_argument("--poll-s", type=float, default=5.0)
    p.add_argument("--executor-input", default=None, metavar="JSON")
    p.add_argument("--run-id", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("step_args", nargs=argparse.REMAINDER, metavar="-- STEP_ARGS",
                   help="the step's own arguments (inputs, overrides), after --")  # fmt: skip

    p = sub.add_parser("clean", help="remove what killed steps left: temporary folders, partial outputs")
    p.add_argument("outputs", nargs="*", metavar="OUT", help="also these outputs (folders or s3:// prefixes)")
    p.add_argument("--tmp", default=None, help="the temporary folder the steps used (default: the system's)")

    p = sub.add_parser("verify", help="verify a step directory or bundle (local or s3://) by its checksums")
    p.add_argument("path")

    p = sub.add_parser("predict", help="classify images with an exported bundle (JSON line per image)")
    p.add_argument("--bundle", required=True)
    p.add_argument(
        "--served-probability",
        action="store_true",
        help="also print a probability remapped so the policy threshold lands on 0.5",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")

    p = sub.add_parser("export-hf", help="a bundle as a timm model folder to push to a model hub")
    p.add_argument("--bundle", required=True, help="export_bundle output directory or URI")
    p.add_argument("--out", required=True, help="local folder to write (then: huggingface-cli upload)")
    p.add_argument("--submitted-by", required=True, metavar="HOTKEY", help="your wallet's hotkey address")
    p.add_argument("--version", dest="model_version", default="1.0.0", help="model version X.Y.Z")
    p.add_argument("--model-name", default="", help="model_card.json model_name")
    p.add_argument("--description", default="", help="model_card.json description")

    p = sub.add_parser("run", help="run the default pipeline locally (demo data when no dataset is given)")
    p.add_argument("--out", default="runs/local", help="output folder or s3:// prefix")
    p.add_argument("--dataset", default=None, help="dataset folder or s3:// prefix (default: demo data)")
    p.add_argument("--force", action="store_true", help="re-run every step even when committed")
    p.add_argument("--checkpoint-root", default="", metavar="DIR_OR_S3",
                   help="checkpoint the training phases under DIR_OR_S3/<run id>/<phase> (Kubeflow: checkpoint_root)")  # fmt: skip
    _common(p, step=False)
    return parser


KFP_MINIO = "minio://"  # how Kubeflow's default artifact store names its objects (bucket/key, S3 API)
LOCATIONS = ("out", "dataset", "path", "bundle", "checkpoint_root", *{n for p in PHASES for n in p.inputs})


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    from streetvision.io.store import check_location

    for name in LOCATIONS:
        if isinstance(value := getattr(args, name, None), str):
            if value.startswith(KFP_MINIO):  # a Kubeflow artifact in its MinIO: an S3 object like any other
                setattr(args, name, value := "s3://" + value[len(KFP_MINIO) :])
            check_location(value, "the path" if name == "path" else f"--{name.replace('_', '-')}")
    if cmd == "verify":
        from streetvision.verify import verify_path

        print(json.dumps(verify_path(args.path)))
        return 0
    if cmd == "clean":
        from streetvision.io import scratch, store

        removed = [str(p) for p in scratch.clean(args.tmp)]
        outputs = {out: store.clean_output(out) for out in args.outputs}
        print(json.dumps({"temporary_roots_removed": removed, "outputs": outputs}))
        return 0
    if cmd == "demo-data":
        from streetvision.data.demo import write_demo

        path = write_demo(args.out, n=args.n, seed=args.seed, size=args.size, domain=args.domain)
        print(f"wrote {args.n} images and labels.csv to {path}")
        return 0
    if cmd == "fingerprint":
        from streetvision.data.dataset import fingerprint
        from streetvision.io import atomic

        value = fingerprint(args.dataset)
        if args.output_file:
            Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(args.output_file, value)
        print(value)
        return 0
    if cmd == "predict":
        from streetvision.predict import predict_cli

        return predict_cli(args.bundle, args.images, served=args.served_probability)
    if cmd == "export-hf":
        from streetvision.publish import export_hf

        export_hf(
            args.bundle,
            args.out,
            submitted_by=args.submitted_by,
            version=args.model_version,
            model_name=args.model_name,
            description=args.description,
        )
        print(f"wrote {args.out}: push it with huggingface-cli upload <user>/<repo> {args.out}")
        return 0
    if cmd == "launch-trainjob":
        from streetvision.trainjob import launch, launch_spec, namespace

        step_args = args.step_args[1:] if args.step_args[:1] == ["--"] else args.step_args
        launch(args.step, [*step_args, "--out", args.out, "--run-id", args.run_id, "--task", args.task],
               spec=launch_spec(args), namespace=namespace(), run_id=args.run_id, task=args.task, out=args.out,
               executor_input=args.executor_input, poll_s=args.poll_s)  # fmt: skip
        return 0
    if cmd == "run":
        from streetvision.pipeline import run_local

        run_local(
            args.out,
            dataset=args.dataset,
            files=args.config,
            overrides=args.overrides,
            force=args.force,
            checkpoint_root=args.checkpoint_root,
        )
        return 0
    from streetvision.steps import run_from_cli

    run_from_cli(cmd.replace("-", "_"), vars(args))
    return 0


def _fail(command: str, message: str) -> int:
    """One line on stderr, with any credential inside a URI masked."""
    from streetvision.io.manifests import redact_text

    line = " ".join(redact_text(message).split())
    print(f"streetvision {command}: error: {line}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except StreetVisionError as e:
        return _fail(args.command, str(e))
    except OSError as e:  # a path the process may not read or write: the environment, not a bug
        return _fail(args.command, f"{e.strerror or type(e).__name__}: {e.filename or e}")
    except KeyboardInterrupt:
        print(
            f"streetvision {args.command}: interrupted; an unfinished step has no manifest and re-runs",
            file=sys.stderr,
        )
        return 130
