"""A setting means the same on Kubeflow and in ``streetvision run``: each compiled variant is read back
and every parameter is followed to the step arguments it sets, which must be the keys ``streetvision run``
routes for the same setting (phases.PARAMETERS), and each variant runs the phases a local run with the
same switches runs."""

import json
import re
from collections import defaultdict

import pytest
import yaml

from pipelines.streetvision import VARIANTS, build_pipeline
from streetvision.phases import PARAMETERS, SHARED, SWITCHES
from streetvision.pipeline import ORDER, plan, route

PLACEHOLDER = re.compile(r"^\{\{\$\.inputs\.parameters\['(\w+)'\]\}\}$")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from kfp import compiler

    specs = {}
    for name, variant in VARIANTS.items():
        path = tmp_path_factory.mktemp("parity") / f"{name}.yaml"
        compiler.Compiler().compile(build_pipeline(variant=variant), str(path))
        specs[name] = next(
            yaml.safe_load_all(path.read_text())
        )  # the pipeline spec; the platform spec follows
    return specs


def _tasks(spec):
    """(stem, {pipeline parameter: step argument it sets}) for every container task of the compiled
    pipeline, through any sub-pipeline: ``key`` of a ``key=value`` argument, or a flag."""
    components, executors = spec["components"], spec["deploymentSpec"]["executors"]
    root = spec["root"]

    def walk(dag, scope):
        for task in dag["tasks"].values():
            bound = {}
            for name, source in task.get("inputs", {}).get("parameters", {}).items():
                if source.get("componentInputParameter") in scope:
                    bound[name] = scope[source["componentInputParameter"]]
            component = components[task["componentRef"]["name"]]
            if "dag" in component:
                yield from walk(component["dag"], bound)
                continue
            container = executors[component["executorLabel"]]["container"]
            yield container["command"][-1].replace("-", "_"), dict(_arguments(container["args"], bound))

    yield from walk(root["dag"], {name: name for name in root["inputDefinitions"]["parameters"]})


def _arguments(args: list[str], bound: dict[str, str]):
    for i, arg in enumerate(args):
        if arg.startswith('{"Concat"'):
            key, value = json.loads(arg)["Concat"]
            m = PLACEHOLDER.match(value)
            if m and m.group(1) in bound:
                yield bound[m.group(1)], key.rstrip("=")
        elif (m := PLACEHOLDER.match(arg)) and m.group(1) in bound and args[i - 1].startswith("--"):
            yield bound[m.group(1)], args[i - 1]


def _kubeflow_reach(spec) -> dict[str, set[tuple[str, str]]]:
    reach = defaultdict(set)
    for stem, arguments in _tasks(spec):
        for parameter, key in arguments.items():
            reach[parameter].add((stem, key))
    return reach


def _local_reach(setting: str) -> set[tuple[str, str]]:
    """Where ``streetvision run SETTING=...`` puts the value, read off the routing itself."""
    if setting == "--checkpoint-root":  # a flag of streetvision run, passed on to the phases that take it
        from streetvision.phases import PHASES

        return {(p.stem, setting) for p in PHASES if p.checkpoints}
    routed = route([], [f"{setting}=7"])
    return {(stem, entry.split("=")[0]) for stem in ORDER for entry in routed[stem]}


def _phases(spec) -> set[str]:
    return {stem for stem, _ in _tasks(spec)} - {"fingerprint"}


def test_every_pipeline_parameter_is_in_some_variant_and_has_its_local_setting(compiled):
    exposed = set().union(*(spec["root"]["inputDefinitions"]["parameters"] for spec in compiled.values()))
    assert exposed == {"dataset_uri", *PARAMETERS}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_parameter_reaches_the_same_phases_and_keys_as_its_local_setting(compiled, variant):
    spec = compiled[variant]
    kubeflow, phases = _kubeflow_reach(spec), _phases(spec)
    for name in set(spec["root"]["inputDefinitions"]["parameters"]) - {"dataset_uri"}:
        local = {(stem, key) for stem, key in _local_reach(PARAMETERS[name].setting) if stem in phases}
        assert kubeflow[name] == local, name
    # and no local setting that Kubeflow exposes reaches one of this variant's phases without its parameter
    for name, parameter in PARAMETERS.items():
        if any(stem in phases for stem, _ in _local_reach(parameter.setting)):
            assert name in spec["root"]["inputDefinitions"]["parameters"], name


def test_seed_reaches_the_splits_and_every_seeded_phase_on_both_sides(compiled):
    expected = {("make_splits", "splits.seed"), ("adapt_explora", "seed"), ("train_baseline", "seed"),
                ("train_gate", "seed"), ("calibrate_scrc", "scrc.seed")}  # fmt: skip
    assert _local_reach("seed") == expected
    assert set().union(*(_kubeflow_reach(s)["seed"] for s in compiled.values())) == expected


def test_views_reach_every_phase_that_reads_views_on_both_sides(compiled):
    expected = {
        ("sweep_thresholds", "sweep.views"),
        ("train_gate", "gate.views"),
        ("calibrate_scrc", "scrc.views"),
    }
    assert _local_reach("views") == expected
    assert set().union(*(_kubeflow_reach(s)["calibrate_on"] for s in compiled.values())) == expected


def test_every_shared_setting_kubeflow_exposes_is_one_parameter():
    settings = [p.setting for p in PARAMETERS.values()]
    exposed = [s.name for s in SHARED if s.name in settings]
    assert {"seed", "views", "model.backbone", "data.image_size", "data.batch_size"} <= set(exposed)
    for name in exposed:
        assert settings.count(name) == 1, name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_variant_runs_the_phases_a_local_run_with_its_switches_runs(compiled, variant):
    settings = VARIANTS[variant].settings()
    assert {s.split("=")[0] for s in settings} == set(SWITCHES.values())
    phases, _, _ = plan(settings)
    assert _phases(compiled[variant]) == set(phases)
    # and each phase once: no task of a variant is copied by the compiler
    stems = [stem for stem, _ in _tasks(compiled[variant])]
    assert len(stems) == len(set(stems))


def test_each_phase_has_one_name_its_output_and_the_inputs_reading_it_share():
    """A phase's stem is its module, CLI command and task; its output (the component artifact) is the
    stem's noun, and an input made by one phase is named by that noun (--baseline reads train_baseline's
    output, whose artifact is baseline). Only an input that several phases can make has a role name."""
    import importlib

    from streetvision.cli import build_parser
    from streetvision.phases import BY_STEM, PHASES, Choice

    commands = build_parser()._subparsers._group_actions[0].choices
    for p in PHASES:
        assert importlib.import_module(f"streetvision.steps.{p.stem}").STEP == p.stem
        assert p.command in commands, p.stem
        for name, made_by in p.inputs.items():
            if made_by is not None and not isinstance(made_by, Choice):
                assert name == BY_STEM[made_by].artifact, (p.stem, name, made_by)
            flags = {o for a in commands[p.command]._actions for o in a.option_strings}
            assert f"--{name}" in flags, (p.stem, name)
    assert [p.artifact for p in PHASES] == [
        "splits", "shards", "explora", "baseline", "thresholds", "gate", "scrc", "bundle"
    ]  # fmt: skip
