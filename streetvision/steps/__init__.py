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


def run_from_cli(stem: str, args: dict[str, Any]):
    from streetvision.data.dataset import local_dataset

    module = importlib.import_module(f"streetvision.steps.{stem}")
    config = load_config(module.Config, args.get("config") or [], args.get("overrides") or [])
    step_inputs, dataset_inputs = STEPS[stem]
    with ExitStack() as stack:
        inputs = {name: stack.enter_context(store.local_step(args[name])) for name in step_inputs}
        inputs |= {name: stack.enter_context(local_dataset(args[name])) for name in dataset_inputs}
        sources = {name: str(args[name]) for name in (*step_inputs, *dataset_inputs)}
        out = stack.enter_context(store.output_step(args["out"]))
        manifest = module.run(config, **inputs, out=out, sources=sources, run_id=args.get("run_id"))
        if args.get("executor_input"):
            from streetvision.kfp_executor import write_executor_output

            write_executor_output(args["executor_input"], out, manifest)
    return manifest
