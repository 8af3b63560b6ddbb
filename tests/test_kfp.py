"""Kubeflow: the committed YAML is what the code compiles to, parses strictly, and wires the phases;
each component's compiled command line runs the real step (contract tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from kfp_launcher import JOB_ID, command_line, load_component

from streetvision.io.manifests import input_record, verify_dir

ROOT = Path(__file__).resolve().parent.parent
STEMS = [
    "make_splits",
    "adapt_explora",
    "train_baseline",
    "sweep_thresholds",
    "train_gate",
    "calibrate_scrc",
    "export_bundle",
]


def without_sdk_version(text):
    return "\n".join(line for line in text.splitlines() if not line.startswith("sdkVersion:"))


@pytest.fixture(scope="module")
def recompiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    (out / "components").mkdir()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.compile",
            "--output",
            str(out / "streetvision.yaml"),
            "--components-dir",
            str(out / "components"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return out


def test_committed_pipeline_yaml_is_what_the_code_compiles_to(recompiled):
    committed = (ROOT / "pipelines" / "streetvision.yaml").read_text()
    assert without_sdk_version((recompiled / "streetvision.yaml").read_text()) == without_sdk_version(
        committed
    ), "pipelines/streetvision.yaml is stale: run `make compile` and commit it"


@pytest.mark.parametrize("stem", STEMS)
def test_committed_component_yaml_is_what_the_code_compiles_to(recompiled, stem):
    committed = (ROOT / "components" / f"{stem}.yaml").read_text()
    assert without_sdk_version(
        (recompiled / "components" / f"{stem}.yaml").read_text()
    ) == without_sdk_version(committed)


@pytest.fixture(scope="module")
def spec():
    docs = list(yaml.safe_load_all((ROOT / "pipelines" / "streetvision.yaml").read_text()))
    pipeline = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())  # strict: unknown fields fail
    platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    return pipeline, platform


class Dag:
    """The compiled pipeline's leaf tasks (inside condition branches and sub-pipelines too) and where each
    input artifact comes from, followed through branch and sub-pipeline inputs to the producing leaf tasks.
    A task inside a sub-pipeline is named by its path: ``calibrate-and-export-2/sweep-thresholds``."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.tasks: dict = {}
        self.branch: dict[str, str] = {}  # leaf task -> the condition component holding it ("" at root)
        self.sources: dict[tuple[str, str], set] = {}  # (leaf task, input) -> {(leaf task, output)}
        self._walk(pipeline.root.dag, {}, "", "")

    def _component(self, task):
        return self.pipeline.components[task.component_ref.name]

    @staticmethod
    def _scope(prefix: str, name: str, task) -> str:
        """The prefix of a DAG task's inner tasks: a sub-pipeline adds its name, a condition nothing."""
        return prefix if task.component_ref.name.startswith("comp-condition") else f"{prefix}{name}/"

    def _outputs(self, prefix, task_name, task, key) -> set:
        component = self._component(task)
        if not component.HasField("dag"):
            return {(prefix + task_name, key)}
        found = set()
        for sel in component.dag.outputs.artifacts[key].artifact_selectors:
            inner = component.dag.tasks[sel.producer_subtask]
            found |= self._outputs(self._scope(prefix, task_name, task), sel.producer_subtask, inner,
                                   sel.output_artifact_key)  # fmt: skip
        return found

    def _resolve(self, dag, spec, context, prefix) -> set:
        if spec.HasField("task_output_artifact"):
            out = spec.task_output_artifact
            return self._outputs(
                prefix, out.producer_task, dag.tasks[out.producer_task], out.output_artifact_key
            )
        return context[spec.component_input_artifact]

    def _walk(self, dag, context, branch, prefix):
        for name, task in dag.tasks.items():
            inputs = {k: self._resolve(dag, v, context, prefix) for k, v in task.inputs.artifacts.items()}
            component = self._component(task)
            if component.HasField("dag"):
                self._walk(component.dag, inputs, task.component_ref.name, self._scope(prefix, name, task))
            else:
                self.tasks[prefix + name], self.branch[prefix + name] = task, branch
                for k, v in inputs.items():
                    self.sources[(prefix + name, k)] = v

    def producer(self, task: str, name: str) -> set:
        return self.sources[(task, name)]


SHIPS = ("calibrate-and-export", "calibrate-and-export-2")  # after phase 1 with and without phase 4


def test_the_compiled_pipeline_is_wired_as_the_phase_registry_says(spec):
    from components.images import BASE_IMAGE, TRAIN_IMAGE
    from streetvision.phases import BY_STEM, PHASES, UNUSED

    pipeline, _ = spec
    dag = Dag(pipeline)
    executors = json_format.MessageToDict(pipeline.deployment_spec)["executors"]
    commands = {p.command for p in PHASES}

    def phase_of(task: str) -> str:  # calibrate-and-export-2/export-bundle-2: an export-bundle task
        leaf = task.rsplit("/", 1)[-1]
        return leaf if leaf in commands or leaf == "importer" else leaf.rsplit("-", 1)[0]

    by_phase: dict[str, list[str]] = {}
    for name in set(dag.tasks) - {"importer", "dataset-fingerprint"}:
        by_phase.setdefault(phase_of(name), []).append(name)
    assert set(by_phase) == commands
    for p in PHASES:
        task = dag.tasks[by_phase[p.command][0]]
        for name, made_by in p.inputs.items():
            stems = () if made_by is None else (made_by,) if isinstance(made_by, str) else made_by
            stems = tuple(m for m in stems if m != UNUSED)
            expected = {(m.replace("_", "-"), BY_STEM[m].artifact) for m in stems} or {
                ("importer", "artifact")
            }
            given = [dag.sources.get((t, name)) for t in by_phase[p.command]]
            got = {(phase_of(t), out) for g in given if g for t, out in g}
            assert got == expected, (p.stem, name)
            # An optional input is left out by some task of the phase, a required one by none.
            assert (None in given) == (name in p.optional_inputs), (p.stem, name)
        component = pipeline.components[task.component_ref.name]
        outputs = component.output_definitions.artifacts
        assert set(outputs) == {p.artifact, *p.ui}, p.stem
        assert all(outputs[name].artifact_type.schema_title == schema for name, schema in p.ui.items()), (
            p.stem
        )
        container = executors[component.executor_label]["container"]
        assert container["image"] == {"base": BASE_IMAGE, "train": TRAIN_IMAGE}[p.image], p.stem
        assert container["command"] == ["python", "-m", "streetvision", p.command], p.stem


@pytest.mark.parametrize("ship", SHIPS)
def test_the_policy_parameter_runs_phase_2_or_phase_5_and_exports_that_one(spec, ship):
    pipeline, _ = spec
    dag = Dag(pipeline)
    task = {name: f"{ship}/{name}" for name in (
        "sweep-thresholds", "export-bundle", "train-gate", "calibrate-scrc", "export-bundle-2", "calibrate-scrc-2",
        "export-bundle-3")}  # fmt: skip
    threshold, gated, margin = (
        dag.branch[task[t]] for t in ("sweep-thresholds", "calibrate-scrc", "calibrate-scrc-2")
    )
    assert len({threshold, gated, margin}) == 3  # never two at once
    members = {b: {t for t, tb in dag.branch.items() if tb == b} for b in (threshold, gated, margin)}
    assert members[threshold] == {task["sweep-thresholds"], task["export-bundle"]}
    assert members[gated] == {
        task["train-gate"],
        task["calibrate-scrc"],
        task["export-bundle-2"],
    }  # phase 3, 5
    assert members[margin] == {task["calibrate-scrc-2"], task["export-bundle-3"]}
    assert dag.producer(task["export-bundle"], "policy") == {(task["sweep-thresholds"], "thresholds")}
    assert dag.producer(task["export-bundle-2"], "policy") == {(task["calibrate-scrc"], "scrc")}
    assert dag.producer(task["export-bundle-3"], "policy") == {(task["calibrate-scrc-2"], "scrc")}
    assert dag.producer(task["calibrate-scrc"], "gate") == {(task["train-gate"], "gate")}
    assert (task["calibrate-scrc-2"], "gate") not in dag.sources

    def constant(name, key):
        return dag.tasks[task[name]].inputs.parameters[key].runtime_value.constant.string_value

    for name, kind in (
        ("export-bundle", "threshold"),
        ("export-bundle-2", "scrc"),
        ("export-bundle-3", "scrc"),
    ):
        assert constant(name, "policy_type") == kind
    assert (constant("calibrate-scrc", "confidence"), constant("calibrate-scrc-2", "confidence")) == (
        "gate",
        "margin",
    )
    triggers = {
        t.component_ref.name: t.trigger_policy.condition
        for c in pipeline.components.values()
        if c.HasField("dag")
        for t in c.dag.tasks.values()
        if t.trigger_policy.condition
    }
    policy_is = "inputs.parameter_values['pipelinechannel--policy'] == 'threshold'"
    gate_is = "inputs.parameter_values['pipelinechannel--scrc_confidence'] == 'gate'"
    assert triggers[threshold] == policy_is
    assert (triggers[gated], triggers[margin]) == (gate_is, f"!({gate_is})")  # the inner If and its Else
    assert f"!({policy_is})" in triggers.values()  # ... inside the outer Else
    defaults = pipeline.root.input_definitions.parameters
    assert defaults["policy"].default_value.string_value == "threshold"
    assert defaults["scrc_confidence"].default_value.string_value == "margin"


def test_the_explora_parameter_runs_phase_4_before_phase_1_and_everything_after_follows_that_training(spec):
    pipeline, _ = spec
    dag = Dag(pipeline)
    adapted, plain = dag.branch["adapt-explora"], dag.branch["train-baseline-2"]
    assert dag.branch["train-baseline"] == adapted != plain
    assert dag.producer("train-baseline", "explora") == {("adapt-explora", "adapted")}
    assert ("train-baseline-2", "explora") not in dag.sources  # the other branch trains from the hub
    for name in ("adapt-explora", "train-baseline", "train-baseline-2"):
        assert dag.producer(name, "splits") == {("make-splits", "splits")}
        assert dag.producer(name, "dataset") == {("importer", "artifact")}
    for ship, train in zip(SHIPS, ("train-baseline", "train-baseline-2"), strict=True):
        leaves = [t for t in dag.tasks if t.startswith(f"{ship}/")]
        assert len(leaves) == 7
        for leaf in leaves:
            assert dag.producer(leaf, "phase1") == {(train, "model")}, leaf
    conditions = {t.trigger_policy.condition for c in pipeline.components.values() if c.HasField("dag")
                  for t in c.dag.tasks.values()}  # fmt: skip
    explora_is = "inputs.parameter_values['pipelinechannel--explora'] == true"
    assert {explora_is, f"!({explora_is})"} <= conditions
    assert pipeline.root.input_definitions.parameters["explora"].default_value.bool_value is False
    params = dag.tasks["adapt-explora"].inputs.parameters
    for key, source in (("epochs", "explora_epochs"), ("rank", "explora_rank"), ("backbone", "backbone"),
                        ("image_size", "image_size")):  # fmt: skip
        assert params[key].component_input_parameter == f"pipelinechannel--{source}", key
    assert dag.tasks["adapt-explora"].retry_policy.max_retry_count == 1


def test_dag_wires_each_output_to_the_right_input(spec):
    pipeline, _ = spec
    dag = Dag(pipeline)
    tasks = dag.tasks
    shipped = {f"{ship}/{t}" for ship in SHIPS for t in (
        "sweep-thresholds", "train-gate", "calibrate-scrc", "calibrate-scrc-2", "export-bundle", "export-bundle-2",
        "export-bundle-3")}  # fmt: skip
    assert set(tasks) == {"importer", "dataset-fingerprint", "make-splits", "adapt-explora", "train-baseline",
                          "train-baseline-2", *shipped}  # fmt: skip
    # The dataset's content reaches the cache key: the never-cached fingerprint feeds make_splits.
    fp = tasks["make-splits"].inputs.parameters["dataset_fingerprint"].task_output_parameter
    assert (fp.producer_task, fp.output_parameter_key) == ("dataset-fingerprint", "fingerprint")
    assert not tasks["dataset-fingerprint"].caching_options.enable_cache
    assert (
        tasks["dataset-fingerprint"].inputs.parameters["dataset_uri"].component_input_parameter
        == "dataset_uri"
    )
    assert dag.producer("make-splits", "dataset") == {("importer", "artifact")}
    for ship in SHIPS:
        assert dag.producer(f"{ship}/train-gate", "dataset") == {("importer", "artifact")}
        for name in ("train-gate", "export-bundle", "export-bundle-2", "export-bundle-3"):
            assert dag.producer(f"{ship}/{name}", "splits") == {("make-splits", "splits")}
    for train in ("train-baseline", "train-baseline-2"):
        params = tasks[train].inputs.parameters
        assert params["lr"].component_input_parameter == "pipelinechannel--lr"
        assert params["backbone"].component_input_parameter == "pipelinechannel--backbone"
        assert tasks[train].retry_policy.max_retry_count == 1
        assert tasks[train].retry_policy.backoff_duration.seconds <= 10
    # Inside a sub-pipeline the pipeline's parameters arrive as the sub-pipeline's own inputs.
    ship = pipeline.components["comp-calibrate-and-export"]
    assert set(ship.input_definitions.artifacts) == {"phase1", "dataset", "splits"}
    assert {"policy", "scrc_alpha", "max_fnr", "min_test_mcc"} <= set(ship.input_definitions.parameters)
    for name in set(tasks) - {"importer", "dataset-fingerprint"}:
        assert tasks[name].caching_options.enable_cache, name
    # Only a preempted training is worth a retry, and a deterministic failure must not wait minutes.
    for name in set(tasks) - {"importer", "train-baseline", "train-baseline-2", "adapt-explora"}:
        assert tasks[name].retry_policy.max_retry_count == 0, name


def test_images_and_credentials_come_from_one_place(spec):
    from components.images import BASE_IMAGE, TRAIN_IMAGE

    pipeline, platform = spec
    executors = json_format.MessageToDict(pipeline.deployment_spec)["executors"]
    images = {name: e["container"]["image"] for name, e in executors.items() if "container" in e}
    assert images["exec-train-baseline"] == TRAIN_IMAGE
    assert {images[f"exec-{s}"] for s in ("make-splits", "sweep-thresholds", "export-bundle")} == {BASE_IMAGE}
    assert all(":" in image.rsplit("/", 1)[-1] or "@sha256:" in image for image in images.values())
    config = json_format.MessageToDict(platform)["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-make-splits", "exec-train-baseline", "exec-sweep-thresholds", "exec-export-bundle"):
        envs = {e["envVar"] for s in config[name]["secretAsEnv"] for e in s["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"} <= envs


def test_gpu_and_node_placement_are_compile_options(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.compile",
            "--output",
            str(tmp_path / "p.yaml"),
            "--components-dir",
            str(tmp_path),
            "--gpus",
            "1",
            "--node-selector",
            "pool=gpu",
            "--toleration",
            "nvidia.com/gpu=present:NoSchedule",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    executors = docs[0]["deploymentSpec"]["executors"]
    k8s = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    from components.images import TRAIN_IMAGE

    trains = [name for name, e in executors.items() if e.get("container", {}).get("image") == TRAIN_IMAGE]
    steps = ("train-baseline", "adapt-explora", "train-gate")
    assert {n.removeprefix("exec-").rsplit("-", 1)[0] if n.removeprefix("exec-") not in steps else n.removeprefix("exec-")
            for n in trains} == set(steps)  # fmt: skip
    for name in trains:  # every step of the training image gets the GPU and the placement
        assert executors[name]["container"]["resources"]["accelerator"]["resourceCount"] == "1", name
        assert k8s[name]["nodeSelector"]["labels"] == {"pool": "gpu"}, name
        assert k8s[name]["tolerations"][0]["effect"] == "NoSchedule", name
    for name in set(executors) - set(trains) - {"exec-importer"}:
        assert "accelerator" not in executors[name]["container"].get("resources", {}), name
        assert "nodeSelector" not in k8s.get(name, {}), name


def test_component_descriptions_come_from_the_docstrings():
    comp = load_component(ROOT / "components" / "sweep_thresholds.yaml")
    outs = comp["spec"]["outputDefinitions"]["artifacts"]
    assert "Confusion matrix" in outs["classification"]["description"]
    assert comp["container"]["command"][:3] == ["python", "-m", "streetvision"]


def run_component(stem, inputs, tmp_path, parameters=None):
    component = load_component(ROOT / "components" / f"{stem}.yaml")
    argv, executor_input = command_line(
        component, inputs, tmp_path / "outputs", parameters, task=stem.replace("_", "-")
    )
    assert argv[:3] == ["python", "-m", "streetvision"]
    r = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Warning" not in r.stderr and "deprecated" not in r.stderr, f"noise in the job's log:\n{r.stderr}"
    out = json.loads((tmp_path / "outputs" / "executor_output.json").read_text())
    json_format.ParseDict(out, pipeline_spec_pb2.ExecutorOutput())
    declared = set(component["spec"]["outputDefinitions"]["artifacts"])
    assert set(out["artifacts"]) == declared, "every declared output is listed in the executor output"
    return out, tmp_path / "outputs"


def test_make_splits_component_runs_its_compiled_command(demo_dataset, tmp_path):
    out, root = run_component("make_splits", {"dataset": demo_dataset}, tmp_path, {"seed": 3})
    m = verify_dir(root / "splits")
    assert m.config["splits"]["seed"] == 3
    assert m.run_id == JOB_ID and m.task == "make-splits"  # the manifest leads back to its Kubeflow run
    assert out["artifacts"]["splits"]["artifacts"][0]["metadata"]["step"] == "make_splits"


@pytest.mark.slow
def test_train_baseline_component_runs_its_compiled_command(demo_dataset, demo_splits, tmp_path):
    params = {
        "backbone": "test_vit",
        "pretrained": False,
        "freeze_backbone": False,
        "epochs": 1,
        "batch_size": 16,
        "image_size": 32,
        "checkpoint_root": str(tmp_path / "checkpoints"),
    }
    out, root = run_component(
        "train_baseline", {"dataset": demo_dataset, "splits": demo_splits}, tmp_path, params
    )
    m = verify_dir(root / "model")
    assert m.config["model"]["backbone"] == "test_vit" and m.config["trainer"]["max_epochs"] == 1
    # Checkpoints go under the run's id, which a retried task shares: it resumes there.
    ckpt = tmp_path / "checkpoints" / JOB_ID / "train-baseline"
    assert m.config["trainer"]["checkpoint_uri"] == str(ckpt) and (ckpt / "last.safetensors").is_file()
    metrics = out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert "val_select_mcc" in metrics and "val_calib_mcc" in metrics


@pytest.mark.slow
def test_adapt_explora_component_runs_its_compiled_command_and_train_baseline_takes_its_output(
    demo_dataset, demo_splits, tmp_path
):
    params = {"backbone": "test_vit", "pretrained": False, "epochs": 1, "batch_size": 16, "image_size": 32,
              "rank": 2, "checkpoint_root": str(tmp_path / "checkpoints")}  # fmt: skip
    out, root = run_component("adapt_explora", {"dataset": demo_dataset, "splits": demo_splits}, tmp_path / "a",
                              params)  # fmt: skip
    m = verify_dir(root / "adapted", "adapt_explora")
    assert m.config["explora"]["rank"] == 2 and m.config["trainer"]["max_epochs"] == 1
    assert (tmp_path / "checkpoints" / JOB_ID / "adapt-explora" / "last.safetensors").is_file()
    assert "trainable_parameters" in out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    train = {"backbone": "test_vit", "pretrained": False, "freeze_backbone": False, "epochs": 1, "image_size": 32,
             "challenge_views": 0}  # fmt: skip
    inputs = {"dataset": demo_dataset, "splits": demo_splits, "explora": root / "adapted"}
    _, troot = run_component("train_baseline", inputs, tmp_path / "t", train)
    assert (
        verify_dir(troot / "model").inputs["explora"]["manifest_sha256"]
        == input_record(root / "adapted")["manifest_sha256"]
    )


@pytest.mark.slow
def test_train_gate_component_runs_its_compiled_command_and_phase_5_answers_by_it(trained, tmp_path):
    inputs = {"phase1": trained["phase1"], "dataset": trained["dataset"], "splits": trained["splits"]}
    out, root = run_component("train_gate", inputs, tmp_path / "g", {"epochs": 2, "train_views": 1})
    verify_dir(root / "gate", "train_gate")
    assert "val_select_gate_auroc" in out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert (root / "report").read_text().startswith("# Learned gate")
    scrc_inputs = {"phase1": trained["phase1"], "gate": root / "gate"}
    _, sroot = run_component(
        "calibrate_scrc", scrc_inputs, tmp_path / "c", {"alpha": 0.9, "confidence": "gate"}
    )
    m = verify_dir(sroot / "scrc", "calibrate_scrc")
    assert m.config["scrc"]["confidence"] == "gate" and "gate" in m.inputs


@pytest.mark.slow
def test_sweep_thresholds_component_runs_its_compiled_command(trained, tmp_path):
    out, root = run_component("sweep_thresholds", {"phase1": trained["phase1"]}, tmp_path, {"max_fnr": 0.5})
    m = verify_dir(root / "thresholds")
    assert m.config["policy"]["max_fnr"] == 0.5
    assert "mcc" in out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert "confusionMatrix" in out["artifacts"]["classification"]["artifacts"][0]["metadata"]
    assert (root / "report").read_text().startswith("# Threshold sweep")


@pytest.mark.slow
def test_calibrate_scrc_component_runs_its_compiled_command_and_export_ships_it(trained, tmp_path):
    out, root = run_component("calibrate_scrc", {"phase1": trained["phase1"]}, tmp_path / "c", {"alpha": 0.9})
    m = verify_dir(root / "scrc", "calibrate_scrc")
    assert m.config["scrc"]["alpha"] == 0.9 and m.config["scrc"]["delta"] == 0.0
    assert "coverage" in out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert (root / "report").read_text().startswith("# Selective conformal risk control")
    inputs = {"phase1": trained["phase1"], "policy": root / "scrc", "splits": trained["splits"]}
    _, broot = run_component("export_bundle", inputs, tmp_path / "e", {"policy_type": "scrc"})
    assert verify_dir(broot / "bundle", "export_bundle").extra["policy_type"] == "scrc"


@pytest.mark.slow
def test_export_bundle_component_runs_its_compiled_command(trained, tmp_path):
    inputs = {"phase1": trained["phase1"], "policy": trained["policy"], "splits": trained["splits"]}
    out, root = run_component("export_bundle", inputs, tmp_path)
    verify_dir(root / "bundle")
    assert "test_mcc" in out["artifacts"]["test_metrics"]["artifacts"][0]["metadata"]
    r = subprocess.run(
        [sys.executable, "-m", "streetvision", "verify", str(root / "bundle")], capture_output=True
    )
    assert r.returncode == 0


def test_options_never_overwrite_the_committed_files(tmp_path, monkeypatch):
    from pipelines import compile as compile_module

    committed = (ROOT / "pipelines" / "streetvision.yaml").read_bytes()
    components = {p.name: p.read_bytes() for p in (ROOT / "components").glob("*.yaml")}
    monkeypatch.setattr(compile_module, "BUILD", tmp_path / "build" / "streetvision.yaml")
    assert compile_module.main(["--gpus", "1", "--train-memory", "64G"]) == 0
    built = yaml.safe_load_all((tmp_path / "build" / "streetvision.yaml").read_text())
    train = next(built)["deploymentSpec"]["executors"]["exec-train-baseline"]["container"]["resources"]
    assert train["resourceMemoryRequest"] == "64G" and train["accelerator"]["resourceCount"] == "1"
    assert sorted(p.name for p in (tmp_path / "build" / "components").glob("*.yaml")) == sorted(components)
    with pytest.raises(SystemExit) as e:
        compile_module.main(["--gpus", "1", "--output", str(ROOT / "pipelines" / "streetvision.yaml")])
    assert e.value.code == 2
    r = subprocess.run(
        [sys.executable, "-m", "pipelines.compile", "--output", str(ROOT / "pipelines" / "streetvision.yaml")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "STREETVISION_REGISTRY": "reg.example/team"},
    )  # fmt: skip
    assert r.returncode == 2 and "defaults only" in r.stderr
    assert (ROOT / "pipelines" / "streetvision.yaml").read_bytes() == committed
    assert {p.name: p.read_bytes() for p in (ROOT / "components").glob("*.yaml")} == components


def test_every_step_requests_cpu_and_memory_and_limits_memory(spec):
    pipeline, _ = spec
    executors = json_format.MessageToDict(pipeline.deployment_spec)["executors"]
    from components.images import TRAIN_IMAGE

    for name, executor in executors.items():
        if "container" not in executor:
            continue  # the importer
        cpu, memory = ("4", "16G") if executor["container"]["image"] == TRAIN_IMAGE else ("1", "2G")
        r = executor["container"]["resources"]
        requested = (r["resourceCpuRequest"], r["resourceMemoryRequest"], r["resourceMemoryLimit"])
        assert requested == (cpu, memory, memory), name
        assert "resourceCpuLimit" not in r  # a CPU limit only throttles


def test_legacy_platform_spec_keeps_only_fields_older_backends_know(tmp_path):
    from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2

    from pipelines.compile import LEGACY_FIELDS

    r = subprocess.run(
        [sys.executable, "-m", "pipelines.compile", "--output", str(tmp_path / "p.yaml"), "--legacy-platform-spec",
         "--node-selector", "pool=gpu", "--toleration", "nvidia.com/gpu=present:NoSchedule"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(executors) == 19  # every container task, in both branches of explora
    for config in executors.values():
        assert set(config) <= set(LEGACY_FIELDS)
        for section, entries in config.items():
            for entry in entries if isinstance(entries, list) else [entries]:
                assert set(entry) <= LEGACY_FIELDS[section], (section, entry)
        json_format.ParseDict(config, k8s_pb2.KubernetesExecutorConfig())  # still a valid spec
    assert executors["exec-train-baseline"]["secretAsEnv"][0]["secretName"] == "streetvision-s3"
    assert executors["exec-train-baseline"]["nodeSelector"] == {"labels": {"pool": "gpu"}}
