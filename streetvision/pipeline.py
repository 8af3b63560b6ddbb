"""``streetvision run``: the default pipeline on one machine, resumable, with the same step code and layout.

Each phase runs as its own ``python -m streetvision <step>`` process (as in its container), writing
``<out>/<stem>`` locally or under an ``s3://`` prefix. A phase whose committed manifest already records
the same config hash and the same input checksums is skipped, so a re-run after a crash or Ctrl-C picks
up where it stopped, and a changed parameter re-runs that phase and everything downstream.

Which phases run follows from the settings, as on Kubeflow (:func:`streetvision.phases.needed`): the
export, the policy ``export.policy`` names, the gate under ``scrc.confidence=gate``, and adapt_explora under
``pipeline.explora=true``; ``pipeline.phases=[make_splits,train_baseline]`` runs a subset instead.

Overrides are the steps' own keys (``model.lr=0.001 sweep.max_fnr=0.1``), routed to the step that owns
the section, or a shared setting of the whole run (``seed=4``, ``views=clean``, ``model.backbone=...``;
:data:`streetvision.phases.SHARED`), routed to every phase that has it. ``demo.n=...`` shapes the
generated demo data used when no dataset is given.
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
from functools import cache
from pathlib import Path
from typing import Any

from streetvision.config import ConfigError, load_config, read_yaml, to_dict
from streetvision.data.dataset import content_identity, fingerprint
from streetvision.errors import StreetVisionError
from streetvision.io import store
from streetvision.io.manifests import Manifest, ManifestError, redact, sha256_json
from streetvision.phases import (
    BY_STEM,
    PHASES,
    SHARED,
    SHARED_BY_NAME,
    WHEN_GIVEN,
    choices,
    needed,
    producers,
)
from streetvision.steps import step_config

ORDER = [p.stem for p in PHASES]  # the phases in dependency order
DEMO_PROFILE = Path(__file__).parent / "configs" / "demo.yaml"


@dataclass
class DemoConfig:
    n: int = 960
    seed: int = 0
    size: int = 96

    def check(self) -> None:
        from streetvision.data.demo import check_demo

        check_demo(self.n, self.seed, self.size, prefix="demo.")


@dataclass
class PipelineConfig:
    phases: list[str] = field(default_factory=list)  # empty: the phases the settings need
    explora: bool = False  # adapt_explora first, train_baseline starting from its adapted backbone


@dataclass
class RunnerConfig:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

    def check(self) -> None:
        if self.pipeline.phases:
            _phases(self.pipeline.phases)
        self.demo.check()


def _flatten(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flatten(f"{prefix}.{k}" if prefix else str(k), v)]
    return [f"{prefix}={json.dumps(value)}"]


@cache
def _defaults(stem: str):
    """A phase's default config, read only: the routing asks for it some 200 times a compile."""
    return step_config(stem)


@cache
def _owners() -> dict[str, str]:
    """Top-level config key -> the owner that reads it (a step stem, or the runner): the default
    pipeline's phases first (``model.lr`` is train_baseline's), then the optional ones."""
    owners = {f.name: "runner" for f in dataclasses.fields(RunnerConfig)}
    for stem in sorted(ORDER, key=lambda s: BY_STEM[s].optional):
        for f in dataclasses.fields(_defaults(stem)):
            owners.setdefault(f.name, stem)
    return owners


def _has(stem: str, key: str) -> bool:
    """Whether ``stem``'s config has the dotted ``key``."""
    node: Any = _defaults(stem)
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return True


def route(files: Sequence[str | Path], overrides: Sequence[str]) -> dict[str, list[str]]:
    """Split YAML files and ``key=value`` overrides by the step (or the runner) that reads each key: a
    shared setting to every phase that has it, under that phase's key, then each phase's own keys (which
    win there); a ``stem.`` prefix names the phase."""
    from omegaconf import OmegaConf

    entries: list[str] = []
    for f in files:
        entries += _flatten("", OmegaConf.to_container(read_yaml(f)))
    entries += list(overrides)
    owners = _owners()
    shared: dict[str, list[str]] = {stem: [] for stem in ORDER}
    own: dict[str, list[str]] = {"runner": [], **{stem: [] for stem in ORDER}}
    for entry in entries:
        key, _, value = entry.partition("=")
        head, _, rest = key.partition(".")
        if key in SHARED_BY_NAME:
            for stem, its_key in SHARED_BY_NAME[key].keys.items():
                shared[stem].append(f"{its_key}={value}")
        elif head in ORDER and rest:  # explicit: train_baseline.model.lr=...
            if agreed := next((s for s in SHARED if s.agree and s.keys.get(head) == rest), None):
                raise ConfigError(
                    f"config key {key!r}: {agreed.name} is one setting for {' and '.join(agreed.keys)}, "
                    f"which must agree; set {agreed.name}=... without a phase prefix"
                )
            own[head].append(f"{rest}={value}")
        elif head in owners:
            owner = owners[head]
            if owner != "runner" and not _has(owner, key):  # data.local_crops: a key only adapt_explora has
                owner = next((stem for stem in ORDER if _has(stem, key)), owner)
            own[owner].append(entry)
        else:
            raise ConfigError(
                f"config key {key!r}: no step reads it (known sections: {', '.join(sorted(owners))}; "
                f"shared settings: {', '.join(SHARED_BY_NAME)})"
            )
    return {owner: shared.get(owner, []) + mine for owner, mine in own.items()}  # its own win


def reach(setting: str) -> set[tuple[str, str]]:
    """(phase, its key or flag) that a setting of the run sets: where ``streetvision run`` routes
    ``setting=...``, or, for a flag of ``streetvision run``, the phases it is passed to."""
    if setting == "--checkpoint-root":
        return {(p.stem, setting) for p in PHASES if p.checkpoints}
    routed = route([], [f"{setting}=0"])
    return {(stem, entry.split("=", 1)[0]) for stem in ORDER for entry in routed[stem]}


def _resolve(files: Sequence[str | Path], overrides: Sequence[str]):
    """(the runner's config, each phase's config, the routed overrides), every value checked before any
    work."""
    routed = route(files, overrides)
    runner = load_config(RunnerConfig, [], routed["runner"])
    return runner, {stem: step_config(stem, [], routed[stem]) for stem in ORDER}, routed


def plan(overrides: Sequence[str]) -> tuple[list[str], dict[str, Any], dict[str, list[str]]]:
    """(the phases a run with these settings executes, in run order; each phase's config; the routed
    overrides): what ``streetvision run`` does without ``pipeline.phases``, and what the Kubeflow compiler
    builds for a variant."""
    runner, configs, routed = _resolve([], overrides)
    return needed(configs, runner.pipeline.explora), configs, routed


def _phases(requested: list[str]) -> list[str]:
    if not requested:
        raise ConfigError("config key 'pipeline.phases': empty; name at least one phase")
    stems = []
    for name in requested:
        if name not in ORDER:
            raise ConfigError(f"pipeline.phases: unknown phase {name!r} (one of {', '.join(ORDER)})")
        stems.append(name)
    return [s for s in ORDER if s in stems]


def _check_optional_inputs(selected: list[str], configs: dict[str, Any]) -> None:
    """Refuse to run a phase whose output no selected phase would read (train_gate with calibrate_scrc answering
    by the margin): an optional input is read only under its setting."""
    for stem in selected:
        for name, setting in BY_STEM[stem].optional_inputs.items():
            if setting == WHEN_GIVEN:
                continue
            wanted = [m for m in choices(stem, name).values() if m in selected]
            if wanted and name not in producers(stem, configs[stem]):
                raise ConfigError(
                    f"pipeline.phases runs {wanted[0]} and {stem}, which reads it only with {setting}; "
                    f"add {setting}, or leave {wanted[0]} out"
                )


def _given(stem: str, selected: list[str]) -> set[str]:
    """The inputs of ``stem`` read when given that this run gives: those whose phase it runs."""
    phase = BY_STEM[stem]
    return {
        name
        for name, setting in phase.optional_inputs.items()
        if setting == WHEN_GIVEN and phase.inputs[name] in selected
    }


def _check_inputs_exist(selected: list[str], configs: dict[str, Any], outs: dict[str, str]) -> None:
    """Before any work: every input of a selected phase is made by this run or already committed."""
    for stem in selected:
        for name, producer in producers(stem, configs[stem], given=_given(stem, selected)).items():
            if (
                producer is not None
                and producer not in selected
                and committed(outs[producer], producer) is None
            ):
                raise StreetVisionError(
                    f"phase {stem} needs a committed {name} at {outs[producer]}; "
                    f"run its phase first (add {producer} to pipeline.phases)"
                )


def committed(uri: str, stem: str) -> tuple[Manifest, str] | None:
    """(manifest, sha256 of manifest.json) of a committed, intact ``stem`` output at ``uri``, or None."""
    try:
        return store.verified(uri, stem)
    except (ManifestError, store.StoreError):
        return None


def _source(config):
    """A step's dataset settings (the defaults for a step that has none)."""
    from streetvision.data.dataset import SourceConfig

    return getattr(config, "source", None) or SourceConfig()


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
            now = fingerprint(uris[name], _source(config)) if "fingerprint" in recorded and BY_STEM[stem].in_place \
                else content_identity(uris[name], _source(config))  # fmt: skip
            if recorded.get("fingerprint" if BY_STEM[stem].in_place else "content_sha256") != now:
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


def _launch(
    stem: str, uris: dict[str, str], out: str, overrides: list[str], run_id: str, checkpoint_root: str
) -> None:
    args = [sys.executable, "-m", "streetvision", stem.replace("_", "-")]
    for name, uri in uris.items():
        args += [f"--{name}", uri]
    if checkpoint_root and BY_STEM[stem].checkpoints:
        args += ["--checkpoint-root", checkpoint_root]
    args += ["--out", out, "--run-id", run_id, *overrides]
    # The phase's output passes through as it comes, but for its one error line, which becomes the run's:
    # a failed run says what failed in one line, as every command does.
    prefix, error = f"streetvision {stem.replace('_', '-')}: error: ", ""
    with subprocess.Popen(args, stderr=subprocess.PIPE, text=True, errors="replace") as phase:  # noqa: S603
        for line in phase.stderr:
            if line.startswith(prefix):
                error = line[len(prefix) :].strip()
            else:
                sys.stderr.write(line)
                sys.stderr.flush()
    if phase.returncode != 0:
        raise StreetVisionError(f"phase {stem}: {error or f'failed (exit {phase.returncode})'}")


def run_local(
    out: str,
    *,
    dataset: str | None = None,
    files: Sequence[str] = (),
    overrides: Sequence[str] = (),
    force: bool = False,
    checkpoint_root: str = "",
) -> dict[str, Any]:
    files = list(files)
    if dataset is None:
        files.insert(0, str(DEMO_PROFILE))
    runner, configs, routed = _resolve(files, overrides)
    p = runner.pipeline
    selected = _phases(p.phases) if p.phases else needed(configs, p.explora)
    _check_optional_inputs(selected, configs)
    outs = {stem: store.join(out, stem) for stem in ORDER}
    _check_inputs_exist(selected, configs, outs)
    data = dataset or _demo_data(out, runner.demo)
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
        reason = "--force" if force else stale_reason(stem, configs[stem], uris, outs[stem])
        if reason is None:
            done[stem] = "up to date, skipped"
            continue
        t0 = time.time()
        print(f"== {stem} -> {outs[stem]} (running: {reason})", flush=True)
        _launch(stem, uris, outs[stem], routed[stem], run_id, checkpoint_root)
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
        for v in ("clean", "challenge"):  # served beside the raw probability cut at 0.5: a regression shows
            if f"{v}_subnet_reward" in m:
                raw = (
                    f" (raw probability cut at 0.5: {m[f'{v}_raw_subnet_reward']:.3f})"
                    if f"{v}_raw_subnet_reward" in m
                    else ""
                )
                lines.append(
                    f"  simulated subnet reward on val_test, {v} views: {m[f'{v}_subnet_reward']:.3f}{raw}"
                )
        lines.append(
            f"  verified bundle: {outs['export_bundle']}  (check: streetvision verify {outs['export_bundle']})"
        )
    result["text"] = "\n".join(lines)
    return result
