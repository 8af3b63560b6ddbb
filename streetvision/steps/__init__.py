"""Pipeline phases, one module per stem; each exposes ``Config`` and one ``run(config, *, inputs..., out)``.

:func:`run_from_cli` is the glue the CLI uses: it resolves and range-checks the config, checks the output
path against the inputs before any work, stages ``s3://`` step inputs (verified as they download; each
step verifies what it reads, local or not), runs the step, and writes the KFP executor
output when asked. The step modules themselves never see URIs, argv or the environment.
"""

from __future__ import annotations

import importlib
import os
import re
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streetvision.config import load_config, to_dict
from streetvision.errors import StreetVisionError
from streetvision.io import scratch, store
from streetvision.phases import BY_STEM, PHASES, WHEN_GIVEN, producers

# stem -> {input name: the phase(s) whose commit it must be, or None for a dataset}; from the registry.
STEPS: dict[str, dict[str, str | None]] = {p.stem: p.inputs for p in PHASES}


def _key(uri: str) -> str:
    """A comparable form of a path or URI: resolved for folders, trailing slashes dropped."""
    return uri.rstrip("/") if store.is_s3(uri) else str(Path(uri).resolve())


def _overlap(a: str, b: str) -> bool:
    """Whether two folders or prefixes are one, or one lies inside the other."""
    if store.is_s3(a) != store.is_s3(b):
        return False
    a, b = _key(a), _key(b)
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def check_out_path(stem: str, uris: dict[str, str], out: str) -> None:
    """Before any work: refuse an output that is, contains or lies inside an input, that holds another
    step's commit or foreign files, or that cannot be written."""
    for name, uri in uris.items():
        if _overlap(out, uri):
            raise StreetVisionError(
                f"--out {out} is, contains or lies inside the input --{name} {uri}; choose another --out"
            )
    if store.is_s3(out):
        store.check_out(out, stem)
        return
    from streetvision.io.outputs import check_out

    check_out(Path(out), stem)
    target = Path(_key(out))
    existing = next(p for p in [target, *target.parents] if p.exists())
    if not existing.is_dir():
        raise StreetVisionError(f"--out {out}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sv-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StreetVisionError(f"--out {out}: cannot write in {existing} ({e.strerror})") from None


def run_step(
    stem: str,
    config,
    uris: dict[str, str],
    out: str,
    *,
    run_id: str | None = None,
    task: str = "",
    executor_input: str | None = None,
):
    """Run one step on local paths or ``s3://`` URIs; returns its manifest (None on non-zero DDP ranks)."""
    from streetvision.data.dataset import local_dataset
    from streetvision.phases import BY_STEM

    module = importlib.import_module(f"streetvision.steps.{stem}")
    if executor_input:
        from streetvision.kfp_executor import parse

        parse(executor_input)  # a malformed executor input fails now, not after the work
    check_out_path(stem, uris, out)
    check_placement(uris, out, getattr(getattr(config, "trainer", None), "checkpoint_uri", ""))
    with ExitStack() as stack:
        stack.enter_context(scratch.step_root(stem))  # every temporary file of the step, removed after it
        phase = BY_STEM[stem]
        inputs = {  # a dataset read in place and a streamed commit are never copied; the rest is staged
            name: uris[name]
            if phase.by_uri(name)
            else stack.enter_context(
                local_dataset(uris[name]) if producer is None else store.staged_step(uris[name], producer)
            )
            for name, producer in producers(stem, config, given=set(uris)).items()
        }
        local_out = stack.enter_context(store.output_step(out, stem, run_id))
        manifest = module.run(config, **inputs, out=local_out, sources=dict(uris), run_id=run_id, task=task)
        if executor_input:
            from streetvision.kfp_executor import write_executor_output

            write_executor_output(executor_input, local_out, manifest)
    return manifest


def read_inputs(stem: str, config, given: set[str]) -> dict[str, str | None]:
    """Input name -> its producing phase, of the inputs this config reads; an optional input given but
    not read under this config, or read but not given, is refused in one line."""
    read = producers(stem, config, given)
    for name, setting in BY_STEM[stem].optional_inputs.items():
        if setting == WHEN_GIVEN:
            continue
        if name in given and name not in read:
            raise StreetVisionError(f"--{name} is read only with {setting}; add that, or leave --{name} out")
        if name in read and name not in given:
            raise StreetVisionError(f"{setting} needs --{name} (a {read[name]} output)")
    return read


@dataclass
class Started:
    """What :func:`start` checked: each commit input's verified manifest, and how the user named each
    input (what the step's own manifest records)."""

    paths: dict[str, Path]
    src: dict[str, str]
    manifests: dict[str, Any]

    def records(self, **datasets) -> dict[str, dict[str, Any]]:
        """The inputs as the step's manifest records them: each commit by its manifest's hash, and each
        dataset given here (``dataset=ds``, as loaded) by its content."""
        from streetvision.data.dataset import dataset_input
        from streetvision.io.manifests import input_record

        records = {name: input_record(self.paths[name], self.src[name]) for name in self.manifests}
        return records | {name: dataset_input(ds, self.src.get(name)) for name, ds in datasets.items()}


def start(stem: str, config, paths: dict[str, Path | None], sources: dict[str, str] | None = None) -> Started:
    """The start-up every step shares, from the declaration: each input that is a commit is verified as
    its producing phase's (manifest first, every file's checksum), and each pair the declaration says
    belongs together is checked, before any work. ``paths``: the step's input folders (None for one not
    given); ``sources``: how the user named them."""
    from streetvision.io.manifests import check_lineage, verify_dir

    given = {name: path for name, path in paths.items() if path is not None}
    src = {name: str(path) for name, path in given.items()} | {
        k: v for k, v in (sources or {}).items() if k in given
    }
    made_by = read_inputs(stem, config, given=set(given))
    manifests = {  # a streamed input (on the object store) by its listing; its objects as they stream in
        name: store.committed_manifest(str(given[name]), producer) if store.is_s3(given[name])
        else verify_dir(given[name], producer)
        for name, producer in made_by.items() if producer
    }  # fmt: skip
    for a, b in BY_STEM[stem].belongs:
        if a in manifests and b in manifests:
            check_lineage(f"--{a} {src[a]}", manifests[a], b, given[b], src[b], StreetVisionError)
    return Started(given, src, manifests)


def commit(outputs, config, inputs: dict[str, Any], metrics: dict[str, Any], *, run_id, task, extra=None):
    """The end every step shares: its resolved config beside the outputs (credentials masked, as in the
    manifest), then the manifest, last."""
    import yaml

    from streetvision.io.manifests import redact

    outputs.write_text(
        "config.yaml", yaml.safe_dump(redact(to_dict(config)), sort_keys=False)
    )  # as the manifest
    return outputs.commit(
        config=to_dict(config), inputs=inputs, metrics=metrics, run_id=run_id, task=task, extra=extra
    )


def step_config(stem: str, files=(), overrides=()):
    """The resolved config of a step: its dataclass defaults, then files, then ``key=value`` overrides."""
    module = importlib.import_module(f"streetvision.steps.{stem}")
    return load_config(module.Config, files, overrides)


# A run id names a folder under --checkpoint-root and is recorded in manifests: a Kubeflow run's UUID, the
# local runner's hex, or a name of the same alphabet; never a path or a URI.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_placement(uris: dict[str, str], out: str, checkpoint_uri: str) -> None:
    """Before any work: a checkpoint location is none of the inputs or the output, and lies in none of
    them and holds none of them (it would write into a commit, or be removed with one)."""
    for name, uri in {**{f"--{n}": u for n, u in uris.items()}, "--out": out}.items():
        if checkpoint_uri and _overlap(checkpoint_uri, uri):
            raise StreetVisionError(
                f"trainer.checkpoint_uri {checkpoint_uri} is, contains or lies inside {name} {uri}; "
                "checkpoints go to a place of their own"
            )


def run_from_cli(stem: str, args: dict[str, Any]):
    overrides = list(args.get("overrides") or [])
    if (run_id := args.get("run_id")) is not None and not RUN_ID.fullmatch(run_id):
        raise StreetVisionError(
            f"--run-id {run_id!r}: 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if root := args.get("checkpoint_root"):  # derived from the run, so every retry of it finds the same place
        if not args.get("run_id"):
            raise StreetVisionError("--checkpoint-root needs --run-id (checkpoints live under the run's id)")
        overrides.append(f"trainer.checkpoint_uri={store.join(root, args['run_id'], stem.replace('_', '-'))}")
    config = step_config(stem, args.get("config") or [], overrides)
    read = read_inputs(stem, config, given={name for name in STEPS[stem] if args.get(name)})
    uris = {name: str(args[name]) for name in read}
    return run_step(
        stem,
        config,
        uris,
        str(args["out"]),
        run_id=args.get("run_id"),
        task=args.get("task") or "",
        executor_input=args.get("executor_input"),
    )
