"""``streetvision run``: the default pipeline on one machine, resumable, with the same step code and layout.

Each phase runs as its own ``python -m streetvision <step>`` process (as in its container), writing
``<out>/<stem>`` locally or under an ``s3://`` prefix. A phase whose committed manifest already records
the same config hash and the same input checksums is skipped, so a re-run after a crash or Ctrl-C picks
up where it stopped, and a changed parameter re-runs that phase and everything downstream.

Overrides are the steps' own keys (``model.lr=0.001 data.batch_size=32 policy.max_fnr=0.1``), routed to
the step that owns the section; ``pipeline.phases=[phase1,phase2,phase6]`` runs a subset whose inputs
exist, and ``demo.n=...`` shapes the generated demo data used when no dataset is given.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streetvision.config import ConfigError, load_config, read_yaml, to_dict
from streetvision.data.dataset import content_identity
from streetvision.errors import StreetVisionError
from streetvision.io import store
from streetvision.io.manifests import Manifest, ManifestError, redact, sha256_json
from streetvision.phases import ALIASES, BY_STEM, PHASES, WHEN_GIVEN, producers
from streetvision.steps import step_config

ORDER = [p.stem for p in PHASES]  # the phases in dependency order
ALIASES_OF = {stem: alias for alias, stem in ALIASES.items()}
DEMO_PROFILE = Path(__file__).parent / "configs" / "demo.yaml"


@dataclass
class DemoConfig:
    n: int = 1200
    seed: int = 0
    size: int = 96

    def check(self) -> None:
        from streetvision.data.demo import check_demo

        check_demo(self.n, self.seed, self.size, prefix="demo.")


@dataclass
class PipelineConfig:
    phases: list[str] = field(default_factory=lambda: [p.alias for p in PHASES if not p.optional])


@dataclass
class RunnerConfig:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def check(self) -> None:
        _phases(self.pipeline.phases)
        self.demo.check()


def _flatten(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [f"{prefix}={json.dumps(value)}"]


def _owners() -> dict[str, str]:
    """Top-level config key -> the owner that reads it (a step stem, or the runner): the default
    pipeline's phases first (``model.lr`` is phase 1's), then the optional ones."""
    owners = {f.name: "runner" for f in dataclasses.fields(RunnerConfig)}
    for stem in sorted(ORDER, key=lambda s: BY_STEM[s].optional):
        for f in dataclasses.fields(step_config(stem)):
            owners.setdefault(f.name, stem)
    return owners


def _has(stem: str, key: str) -> bool:
    """Whether ``stem``'s config has the dotted ``key``."""
    node: Any = step_config(stem)
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


def _inherits() -> dict[str, tuple[str, ...]]:
    """stem -> the keys it takes from their owner unless given its own (``steps.<stem>.INHERITS``):
    phase 4 adapts the backbone phase 1 trains, on the same hardware."""
    import importlib

    return {
        stem: getattr(importlib.import_module(f"streetvision.steps.{stem}"), "INHERITS", ()) for stem in ORDER
    }


def route(files: Sequence[str | Path], overrides: Sequence[str]) -> dict[str, list[str]]:
    """Split YAML files and ``key=value`` overrides by the step (or the runner) that owns each key."""
    from omegaconf import OmegaConf

    entries: list[str] = []
    for f in files:
        entries += _flatten("", OmegaConf.to_container(read_yaml(f)))
    entries += list(overrides)
    owners, routed = _owners(), {"runner": [], **{stem: [] for stem in ORDER}}
    inherits, inherited = _inherits(), {stem: [] for stem in ORDER}
    for entry in entries:
        key = entry.split("=", 1)[0]
        head, _, rest = key.partition(".")
        if head in ORDER and rest:  # explicit: train_baseline.model.lr=...
            routed[head].append(entry.split(".", 1)[1])
        elif head in owners:
            owner = owners[head]
            if owner != "runner" and not _has(owner, key):  # data.local_crops: a key only phase 4 has
                owner = next((stem for stem in ORDER if _has(stem, key)), owner)
            routed[owner].append(entry)
            for stem, keys in inherits.items():
                if key in keys and stem != owner:
                    inherited[stem].append(entry)
        else:
            raise ConfigError(
                f"config key {key!r}: no step reads it (known sections: {', '.join(sorted(owners))})"
            )
    return {owner: inherited.get(owner, []) + own for owner, own in routed.items()}  # its own win


def _phases(requested: list[str]) -> list[str]:
    if not requested:
        raise ConfigError("config key 'pipeline.phases': empty; name at least one phase")
    stems = []
    for name in requested:
        stem = ALIASES.get(name, name)
        if stem not in ORDER:
            raise ConfigError(
                f"pipeline.phases: unknown phase {name!r} (use {', '.join(ALIASES)} or step names)"
            )
        stems.append(stem)
    return [s for s in ORDER if s in stems]


def _check_optional_inputs(selected: list[str], configs: dict[str, Any]) -> None:
    """Refuse to run a phase whose output no selected phase would read (phase 3 with phase 5 answering
    by the margin): an optional input is read only under its setting."""
    for stem in selected:
        for name, setting in BY_STEM[stem].optional_inputs.items():
            if setting == WHEN_GIVEN:
                continue
            wanted = [m for m in BY_STEM[stem].inputs[name] if m in selected]
            if wanted and name not in producers(stem, configs[stem]):
                raise ConfigError(
                    f"pipeline.phases runs {wanted[0]} and {stem}, which reads it only with {setting}; "
                    f"add {setting}, or leave {ALIASES_OF[wanted[0]]} out"
                )


def _given(stem: str, selected: list[str]) -> set[str]:
    """The inputs of ``stem`` read when given that this run gives: those whose phase it runs."""
    phase = BY_STEM[stem]
    return {
        name
        for name, setting in phase.optional_inputs.items()
        if setting == WHEN_GIVEN and phase.inputs[name] in selected
    }


def committed(uri: str, stem: str) -> tuple[Manifest, str] | None:
    """(manifest, sha256 of manifest.json) of a committed, intact ``stem`` output at ``uri``, or None."""
    try:
        return store.verified(uri, stem)
    except (ManifestError, store.StoreError):
        return None


def stale_reason(stem: str, config, uris: dict[str, str], out: str) -> str | None:
    """Why ``stem`` must run again (None when its committed output is up to date)."""
    try:
        manifest, _ = store.verified(out, stem)
    except ManifestError as e:
        if "no manifest.json" in str(e) or "no such folder" in str(e):
            return "not run yet"
        return f"its committed output failed verification ({e})"
    if manifest.config_sha256 != sha256_json(redact(to_dict(config))):
        return "its config changed"
    read = producers(stem, config, given=set(uris))
    if dropped := [n for n in BY_STEM[stem].optional_inputs if n in manifest.inputs and n not in read]:
        return f"input {dropped[0]} is no longer given"
    for name, producer in read.items():
        recorded = manifest.inputs.get(name, {})
        if producer is None:
            if recorded.get("content_sha256") != content_identity(uris[name]):
                return f"input {name} changed (its images or labels differ from the last run)"
            continue
        upstream = committed(uris[name], producer)
        if upstream is None or recorded.get("manifest_sha256") != upstream[1]:
            return f"input {name} changed"
    return None


def _demo_data(out: str, demo: DemoConfig) -> str:
    """Generate the demo dataset under ``out/data`` once. Its settings, ``demo.json``, are written last,
    so a generation or upload cut short is redone rather than taken for a complete dataset."""
    from streetvision.data.demo import write_demo

    uri = store.join(out, "data")
    marker, marker_uri = json.dumps(dataclasses.asdict(demo), sort_keys=True), store.join(uri, "demo.json")
    if store.exists(marker_uri) and store.read_bytes(marker_uri).decode() == marker:
        return uri
    write_demo(uri, n=demo.n, seed=demo.seed, size=demo.size)
    store.write_bytes(marker_uri, marker.encode())
    return uri


def _launch(stem: str, uris: dict[str, str], out: str, overrides: list[str], run_id: str) -> None:
    args = [sys.executable, "-m", "streetvision", stem.replace("_", "-")]
    for name, uri in uris.items():
        args += [f"--{name}", uri]
    args += ["--out", out, "--run-id", run_id, *overrides]
    code = subprocess.run(args).returncode  # noqa: S603 - our own CLI, arguments from the user's own command
    if code != 0:
        raise StreetVisionError(f"phase {stem} failed (exit {code}); its error is printed above")


def run_local(
    out: str,
    *,
    dataset: str | None = None,
    files: Sequence[str] = (),
    overrides: Sequence[str] = (),
    force: bool = False,
) -> dict[str, Any]:
    files = list(files)
    if dataset is None:
        files.insert(0, str(DEMO_PROFILE))
    routed = route(files, overrides)
    runner = load_config(RunnerConfig, [], routed["runner"])
    selected = _phases(runner.pipeline.phases)
    configs = {stem: step_config(stem, [], routed[stem]) for stem in ORDER}  # all validated before any work
    _check_optional_inputs(selected, configs)
    data = dataset or _demo_data(out, runner.demo)
    outs = {stem: store.join(out, stem) for stem in ORDER}
    run_id = uuid.uuid4().hex
    done: dict[str, str] = {}
    for stem in ORDER:
        made_by = producers(stem, configs[stem], given=_given(stem, selected))
        uris = {name: data if producer is None else outs[producer] for name, producer in made_by.items()}
        if stem not in selected:
            if committed(outs[stem], stem):
                done[stem] = "not selected"
            elif not BY_STEM[stem].optional:  # an optional phase that never ran is no part of this pipeline
                done[stem] = "absent"
            continue
        for name, producer in made_by.items():
            if producer is not None and committed(uris[name], producer) is None:
                raise StreetVisionError(
                    f"phase {stem} needs a committed {name} at {uris[name]}; "
                    "run its phase first (add it to pipeline.phases)"
                )
        reason = "--force" if force else stale_reason(stem, configs[stem], uris, outs[stem])
        if reason is None:
            done[stem] = "up to date, skipped"
            continue
        t0 = time.time()
        print(f"== {stem} -> {outs[stem]} (running: {reason})", flush=True)
        _launch(stem, uris, outs[stem], routed[stem], run_id)
        done[stem] = f"ran in {time.time() - t0:.1f}s"
    summary = _summary(outs, done)
    print(summary["text"], flush=True)
    return summary


def _summary(outs: dict[str, str], done: dict[str, str]) -> dict[str, Any]:
    lines = ["", "StreetVision run summary"]
    lines += [f"  {stem:<17} {state}" for stem, state in done.items()]
    result: dict[str, Any] = {"steps": done}
    sweep, export = (
        committed(outs["sweep_thresholds"], "sweep_thresholds"),
        committed(outs["export_bundle"], "export_bundle"),
    )
    if sweep:
        m = sweep[0].metrics
        result["val_calib"] = m
        lines.append(
            f"  val_calib        MCC {m['mcc']:.3f}  accuracy {m['accuracy']:.3f}  FNR {m['fnr']:.3f}  "
            f"FPR {m['fpr']:.3f}  at threshold {m['threshold']:.4f} (n={m['n']})"
        )
    if export:
        m = export[0].metrics
        result["test"] = m
        result["bundle"] = outs["export_bundle"]
        lines.append(
            f"  val_test (held out) MCC {m['test_mcc']:.3f}  accuracy {m['test_accuracy']:.3f}  "
            f"FNR {m['test_fnr']:.3f}  FPR {m['test_fpr']:.3f}"
        )
        rewards = [
            f"{v}: {m[f'{v}_subnet_reward']:.3f}" for v in ("clean", "challenge") if f"{v}_subnet_reward" in m
        ]
        if rewards:
            lines.append(f"  simulated subnet reward on val_test  {'  '.join(rewards)}")
        lines.append(
            f"  verified bundle: {outs['export_bundle']}  (check: streetvision verify {outs['export_bundle']})"
        )
    result["text"] = "\n".join(lines)
    return result
