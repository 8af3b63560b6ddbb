"""Pipeline phases, one module per stem; each exposes ``Config`` and one ``run(config, *, inputs..., out)``.

:func:`run_from_cli` is the glue the CLI uses: it resolves the config, stages ``s3://`` inputs and outputs
through the store (verifying step inputs by their manifests first), runs the step, and writes the KFP
executor output when asked. The step modules themselves never see URIs, argv or the environment.
"""

from __future__ import annotations

import importlib
from contextlib import ExitStack
from typing import Any

from streetvision.config import load_config
from streetvision.io import store

# stem -> (inputs that are committed step directories, inputs that are datasets)
STEPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "make_splits": ((), ("dataset",)),
    "train_baseline": (("splits",), ("dataset",)),
    "sweep_thresholds": (("phase1",), ()),
    "export_bundle": (("phase1", "policy", "splits"), ()),
}


def run_step(
    stem: str,
    config,
    uris: dict[str, str],
    out: str,
    *,
    run_id: str | None = None,
    executor_input: str | None = None,
):
    """Run one step on local paths or ``s3://`` URIs; returns its manifest (None on non-zero DDP ranks)."""
    from streetvision.data.dataset import local_dataset

    module = importlib.import_module(f"streetvision.steps.{stem}")
    step_inputs, dataset_inputs = STEPS[stem]
    with ExitStack() as stack:
        inputs = {name: stack.enter_context(store.local_step(uris[name])) for name in step_inputs}
        inputs |= {name: stack.enter_context(local_dataset(uris[name])) for name in dataset_inputs}
        sources = {name: str(uris[name]) for name in (*step_inputs, *dataset_inputs)}
        local_out = stack.enter_context(store.output_step(out))
        manifest = module.run(config, **inputs, out=local_out, sources=sources, run_id=run_id)
        if executor_input:
            from streetvision.kfp_executor import write_executor_output

            write_executor_output(executor_input, local_out, manifest)
    return manifest


def step_config(stem: str, files=(), overrides=()):
    """The resolved config of a step: its dataclass defaults, then files, then ``key=value`` overrides."""
    module = importlib.import_module(f"streetvision.steps.{stem}")
    return load_config(module.Config, files, overrides)


def run_from_cli(stem: str, args: dict[str, Any]):
    config = step_config(stem, args.get("config") or [], args.get("overrides") or [])
    uris = {name: str(args[name]) for name in (*STEPS[stem][0], *STEPS[stem][1])}
    return run_step(
        stem,
        config,
        uris,
        str(args["out"]),
        run_id=args.get("run_id"),
        executor_input=args.get("executor_input"),
    )
