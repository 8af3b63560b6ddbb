"""Kubeflow: the committed YAML is what the code compiles to, parses strictly, and wires the phases;
each component's compiled command line runs the real step (contract tests)."""

import hashlib
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

from pipelines.streetvision import VARIANTS, compile_plan
from streetvision.io import store
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
    """Every variant compiled in this process, as ``make compile`` does (its command line is run by
    test_options_never_overwrite_the_committed_files)."""
    from pipelines.compile import compile_all

    out = tmp_path_factory.mktemp("compiled")
    (out / "components").mkdir()
    for name in VARIANTS:
        compile_all(out / f"{name}.yaml", out / "components", variant=name)
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_committed_pipeline_yaml_is_what_the_code_compiles_to(recompiled, variant):
    committed = (ROOT / "pipelines" / f"{variant}.yaml").read_text()
    assert without_sdk_version((recompiled / f"{variant}.yaml").read_text()) == without_sdk_version(
        committed
    ), f"pipelines/{variant}.yaml is stale: run `make compile` and commit it"


@pytest.mark.parametrize("stem", STEMS)
def test_committed_component_yaml_is_what_the_code_compiles_to(recompiled, stem):
    committed = (ROOT / "components" / f"{stem}.yaml").read_text()
    assert without_sdk_version(
        (recompiled / "components" / f"{stem}.yaml").read_text()
    ) == without_sdk_version(committed)


def parse(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    pipeline = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())  # strict: unknown fields fail
    platform = json_format.ParseDict(docs[1], pipeline_spec_pb2.PlatformSpec())
    return pipeline, platform


@pytest.fixture(scope="module")
def specs():
    """Every committed variant: name -> (pipeline spec, platform spec)."""
    return {name: parse(ROOT / "pipelines" / f"{name}.yaml") for name in VARIANTS}


@pytest.fixture(scope="module")
def spec(specs):
    return specs["streetvision"]


def tasks_by_phase(pipeline) -> dict[str, object]:
    """The compiled tasks by the component they run (``train-baseline``): each appears once."""
    tasks = pipeline.root.dag.tasks
    by_component = {t.component_ref.name.removeprefix("comp-"): t for t in tasks.values()}
    assert len(by_component) == len(tasks), "a component is compiled into more than one task"
    return by_component


def producer(task, name: str) -> tuple[str, str]:
    """(producing component, output) of a task's input artifact."""
    source = task.inputs.artifacts[name].task_output_artifact
    return source.producer_task, source.output_artifact_key


def test_each_variant_is_wired_as_the_phase_declaration_says(specs):
    from components.images import BASE_IMAGE, TRAIN_IMAGE
    from streetvision.phases import BY_STEM, PHASES, Choice

    seen, optional_given = set(), {}
    for name, (pipeline, _) in specs.items():
        variant = VARIANTS[name]
        plan = compile_plan(variant)
        tasks = tasks_by_phase(pipeline)
        assert set(tasks) == {"dataset-fingerprint", *(s.replace("_", "-") for s in plan.phases)}
        executors = json_format.MessageToDict(pipeline.deployment_spec)["executors"]
        for stem in plan.phases:
            p, task = BY_STEM[stem], tasks[stem.replace("_", "-")]
            seen.add(stem)
            for input_name, made_by in p.inputs.items():
                if input_name not in plan.inputs[stem]:
                    assert input_name not in task.inputs.artifacts, (name, stem, input_name)
                    optional_given.setdefault((stem, input_name), set()).add(False)
                    continue
                optional_given.setdefault((stem, input_name), set()).add(True)
                made = plan.inputs[stem][input_name]
                if p.by_uri(
                    input_name
                ):  # by its URI: the pipeline's dataset_uri, or the producer's <artifact>_uri
                    assert input_name not in task.inputs.artifacts, (name, stem, input_name)
                    given = task.inputs.parameters[f"{input_name}_uri"]
                    source = given.task_output_parameter
                    assert (
                        given.component_input_parameter == "dataset_uri"
                        if made is None
                        else (source.producer_task, source.output_parameter_key)
                        == (made.replace("_", "-"), f"{BY_STEM[made].artifact}_uri")
                    ), (name, stem, input_name)
                    continue
                assert producer(task, input_name) == (made.replace("_", "-"), BY_STEM[made].artifact), (
                    name,
                    stem,
                )
                if made is not None:
                    assert made in (made_by.by_value.values() if isinstance(made_by, Choice) else (made_by,))
            component = pipeline.components[task.component_ref.name]
            outputs = component.output_definitions.artifacts
            assert set(outputs) == {p.artifact, *p.ui}, stem
            assert set(component.output_definitions.parameters) == (
                {f"{p.artifact}_uri"} if p.streamed else set()
            )
            assert all(outputs[o].artifact_type.schema_title == schema for o, schema in p.ui.items()), stem
            container = executors[component.executor_label]["container"]
            assert container["image"] == {"base": BASE_IMAGE, "train": TRAIN_IMAGE}[p.image], stem
            assert container["command"] == ["python", "-m", "streetvision", p.command], stem
            assert task.retry_policy.max_retry_count == (1 if p.checkpoints else 0), stem
            assert task.caching_options.enable_cache, stem
    assert seen == {p.stem for p in PHASES}  # every phase ships in some variant
    for (stem, input_name), given in optional_given.items():  # an optional input is left out somewhere
        assert (given == {True, False}) == (input_name in BY_STEM[stem].optional_inputs), (stem, input_name)


def test_the_variants_ship_the_policy_their_name_says(specs):
    def constant(task, key):
        return task.inputs.parameters[key].runtime_value.constant.string_value

    default = tasks_by_phase(specs["streetvision"][0])
    assert producer(default["export-bundle"], "policy") == ("sweep-thresholds", "thresholds")
    assert constant(default["export-bundle"], "policy_type") == "threshold"
    scrc = tasks_by_phase(specs["streetvision-scrc"][0])
    assert producer(scrc["export-bundle"], "policy") == ("calibrate-scrc", "scrc")
    assert constant(scrc["export-bundle"], "policy_type") == "scrc"
    assert (
        constant(scrc["calibrate-scrc"], "confidence") == "margin"
        and "gate" not in scrc["calibrate-scrc"].inputs.artifacts
    )
    gate = tasks_by_phase(specs["streetvision-scrc-gate"][0])
    assert producer(gate["calibrate-scrc"], "gate") == ("train-gate", "gate")
    assert constant(gate["calibrate-scrc"], "confidence") == "gate"
    explora = tasks_by_phase(specs["streetvision-explora"][0])
    assert producer(explora["train-baseline"], "explora") == ("adapt-explora", "explora")
    params = explora["adapt-explora"].inputs.parameters
    for key, source in (("epochs", "explora_epochs"), ("rank", "explora_rank"), ("backbone", "backbone"),
                        ("image_size", "image_size"), ("seed", "seed")):  # fmt: skip
        assert params[key].component_input_parameter == source, key
    # No runtime branch anywhere: the switches are compile-time.
    for pipeline, _ in specs.values():
        assert not any(t.trigger_policy.condition for t in pipeline.root.dag.tasks.values())
        assert not any(c.HasField("dag") for c in pipeline.components.values())


def test_the_default_pipeline_is_short_enough_to_review(spec):
    text = (ROOT / "pipelines" / "streetvision.yaml").read_text()
    assert len(text.splitlines()) < 1500
    assert text.count("pipelinechannel--") == 0


def test_dag_wires_the_fingerprint_into_the_cache_key(spec):
    pipeline, _ = spec
    tasks = tasks_by_phase(pipeline)
    # The dataset's content reaches the cache key: the never-cached fingerprint feeds make_splits.
    fp = tasks["make-splits"].inputs.parameters["dataset_fingerprint"].task_output_parameter
    assert (fp.producer_task, fp.output_parameter_key) == ("dataset-fingerprint", "fingerprint")
    assert not tasks["dataset-fingerprint"].caching_options.enable_cache
    assert (
        tasks["dataset-fingerprint"].inputs.parameters["dataset_uri"].component_input_parameter
        == "dataset_uri"
    )
    params = tasks["train-baseline"].inputs.parameters
    assert params["lr"].component_input_parameter == "lr"
    assert params["backbone"].component_input_parameter == "backbone"
    assert tasks["train-baseline"].retry_policy.backoff_duration.seconds <= 10


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
            "--variant",
            "streetvision-scrc-gate",
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

    images = {name: e.get("container", {}).get("image") for name, e in executors.items()}
    assert {n.removeprefix("exec-") for n, image in images.items() if image == TRAIN_IMAGE} == {
        "pack-shards", "train-baseline", "train-gate"
    }  # fmt: skip
    trains = ["exec-train-baseline", "exec-train-gate"]  # the phases that run a network: GPU and placement
    for name in trains:
        assert executors[name]["container"]["resources"]["accelerator"]["resourceCount"] == "1", name
        assert k8s[name]["nodeSelector"]["labels"] == {"pool": "gpu"}, name
        assert k8s[name]["tolerations"][0]["effect"] == "NoSchedule", name
    for name in set(executors) - set(trains):  # packing decodes images: no GPU
        assert "accelerator" not in executors[name]["container"].get("resources", {}), name
        assert "nodeSelector" not in k8s.get(name, {}), name
    for name in ("exec-pack-shards", *trains):  # their temporary folder (the stream cache) on an emptyDir
        assert k8s[name]["emptyDirMounts"][0]["mountPath"] == "/scratch", name
        assert {"name": "TMPDIR", "value": "/scratch"} in executors[name]["container"]["env"], name


def test_scratch_folders_can_be_claims_the_scheduler_reserves(tmp_path):
    """An emptyDir's size limit only evicts; with --scratch-class each streaming or packing task's
    temporary folder is a generic ephemeral volume, a claim of that size made before the pod is placed."""
    from pipelines import compile as compile_module

    out = tmp_path / "p.yaml"
    argv = ["--scratch-class", "fast-local", "--output", str(out), "--components-dir", str(tmp_path / "c")]
    assert compile_module.main(argv) == 0
    k8s = list(yaml.safe_load_all(out.read_text()))[1]["platforms"]["kubernetes"]["deploymentSpec"][
        "executors"
    ]
    for name, size in (("exec-pack-shards", "4Gi"), ("exec-train-baseline", "10Gi")):
        (volume,) = k8s[name]["genericEphemeralVolume"]
        assert (volume["mountPath"], volume["size"], volume["storageClassName"]) == (
            "/scratch",
            size,
            "fast-local",
        )
        assert "emptyDirMounts" not in k8s[name]
    assert "genericEphemeralVolume" not in k8s["exec-sweep-thresholds"]
    with pytest.raises(SystemExit, match="no legacy form for genericEphemeralVolume"):
        compile_module.main([*argv, "--legacy-platform-spec"])


def test_component_descriptions_come_from_the_docstrings():
    comp = load_component(ROOT / "components" / "sweep_thresholds.yaml")
    outs = comp["spec"]["outputDefinitions"]["artifacts"]
    assert "Confusion matrix" in outs["classification"]["description"]
    assert comp["container"]["command"][:3] == ["python", "-m", "streetvision"]


def run_component(stem, inputs, tmp_path, parameters=None, output_uris=None):
    component = load_component(ROOT / "components" / f"{stem}.yaml")
    argv, executor_input = command_line(
        component,
        inputs,
        tmp_path / "outputs",
        parameters,
        task=stem.replace("_", "-"),
        output_uris=output_uris,
    )
    assert argv[:3] == ["python", "-m", "streetvision"]
    r = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Warning" not in r.stderr and "deprecated" not in r.stderr, f"noise in the job's log:\n{r.stderr}"
    out = json.loads((tmp_path / "outputs" / "executor_output.json").read_text())
    json_format.ParseDict(out, pipeline_spec_pb2.ExecutorOutput())
    declared = set(component["spec"]["outputDefinitions"]["artifacts"])
    assert set(out["artifacts"]) == declared, "every declared output is listed in the executor output"
    parameters = set(component["spec"]["outputDefinitions"].get("parameters", {}))
    assert set(out["parameterValues"]) == parameters, "and every declared output parameter"
    return out, tmp_path / "outputs"


def test_make_splits_component_runs_its_compiled_command(demo_dataset, tmp_path):
    out, root = run_component("make_splits", {}, tmp_path, {"dataset_uri": str(demo_dataset), "seed": 3})
    m = verify_dir(root / "splits")
    assert m.config["splits"]["seed"] == 3
    assert m.run_id == JOB_ID and m.task == "make-splits"  # the manifest leads back to its Kubeflow run
    assert out["artifacts"]["splits"]["artifacts"][0]["metadata"]["step"] == "make_splits"


@pytest.mark.slow
def test_the_dataset_and_the_pack_go_by_uri_and_are_never_copied_into_a_pod(
    s3, demo_dataset, demo_splits, tmp_path, monkeypatch
):
    """On a cluster the launcher copies every input artifact into the pod before the command starts, and
    uploads what the command leaves at an output's mount. So the dataset is a URI parameter, pack_shards
    commits straight to its artifact's URI (leaving nothing at the mount) and hands the URI on as a
    parameter, and train_baseline streams from it (here in the minio:// form of Kubeflow's default store)."""
    from kfp_launcher import local_path

    store.upload_tree(demo_dataset, f"{s3}/data")
    shards = f"{s3}/pipeline-root/run/pack-shards/shards"
    out, root = run_component("pack_shards", {"splits": demo_splits}, tmp_path / "p",
                              {"dataset_uri": f"{s3}/data", "max_side": 64}, {"shards": shards})  # fmt: skip
    m = store.committed_manifest(shards, "pack_shards")
    assert m.config["pack"]["max_side"] == 64 and m.task == "pack-shards"
    assert not Path(local_path(shards)).exists(), "the launcher would upload (and the pod hold) a copy"
    assert out["parameterValues"] == {"shards_uri": shards}
    assert out["artifacts"]["metrics"]["artifacts"][0]["metadata"]["images"] == 80
    for name, component in (("make_splits", "make_splits"), ("pack_shards", "pack_shards"),
                            ("train_baseline", "train_baseline")):  # fmt: skip
        spec = load_component(ROOT / "components" / f"{component}.yaml")["spec"]
        assert set(spec.get("inputDefinitions", {}).get("artifacts", {})) <= {"splits", "explora"}, name
    params = {"shards_uri": shards.replace("s3://", "minio://"), "backbone": "test_vit", "pretrained": False,
              "freeze_backbone": False, "epochs": 1, "batch_size": 16, "image_size": 32, "challenge_views": 0}  # fmt: skip
    _, troot = run_component("train_baseline", {}, tmp_path / "t", params)
    committed = hashlib.sha256(store.read_bytes(f"{shards}/manifest.json")).hexdigest()
    assert verify_dir(troot / "baseline").inputs["shards"]["manifest_sha256"] == committed


@pytest.mark.slow
def test_train_baseline_component_runs_its_compiled_command(demo_pack, tmp_path):
    params = {
        "backbone": "test_vit",
        "pretrained": False,
        "freeze_backbone": False,
        "epochs": 1,
        "batch_size": 16,
        "image_size": 32,
        "checkpoint_root": str(tmp_path / "checkpoints"),
    }
    out, root = run_component("train_baseline", {}, tmp_path, params | {"shards_uri": str(demo_pack)})
    m = verify_dir(root / "baseline")
    assert m.config["model"]["backbone"] == "test_vit" and m.config["trainer"]["max_epochs"] == 1
    # Checkpoints go under the run's id, which a retried task shares: it resumes there.
    ckpt = tmp_path / "checkpoints" / JOB_ID / "train-baseline"
    assert m.config["trainer"]["checkpoint_uri"] == str(ckpt) and (ckpt / "last.safetensors").is_file()
    metrics = out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert "val_select_mcc" in metrics and "val_calib_mcc" in metrics


@pytest.mark.slow
def test_adapt_explora_component_runs_its_compiled_command_and_train_baseline_takes_its_output(
    demo_pack, tmp_path
):
    params = {"backbone": "test_vit", "pretrained": False, "epochs": 1, "batch_size": 16, "image_size": 32,
              "rank": 2, "checkpoint_root": str(tmp_path / "checkpoints")}  # fmt: skip
    out, root = run_component("adapt_explora", {}, tmp_path / "a", params | {"shards_uri": str(demo_pack)})
    m = verify_dir(root / "explora", "adapt_explora")
    assert m.config["explora"]["rank"] == 2 and m.config["trainer"]["max_epochs"] == 1
    assert (tmp_path / "checkpoints" / JOB_ID / "adapt-explora" / "last.safetensors").is_file()
    assert "trainable_parameters" in out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    train = {"backbone": "test_vit", "pretrained": False, "freeze_backbone": False, "epochs": 1, "image_size": 32,
             "challenge_views": 0, "shards_uri": str(demo_pack)}  # fmt: skip
    _, troot = run_component("train_baseline", {"explora": root / "explora"}, tmp_path / "t", train)
    assert (
        verify_dir(troot / "baseline").inputs["explora"]["manifest_sha256"]
        == input_record(root / "explora")["manifest_sha256"]
    )


@pytest.mark.slow
def test_train_gate_component_runs_its_compiled_command_and_phase_5_answers_by_it(trained, tmp_path):
    out, root = run_component("train_gate", {"baseline": trained["baseline"]}, tmp_path / "g",
                              {"epochs": 2, "train_views": 1, "shards_uri": str(trained["shards"])})  # fmt: skip
    verify_dir(root / "gate", "train_gate")
    assert "val_select_gate_auroc" in out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert (root / "report").read_text().startswith("# Learned gate")
    scrc_inputs = {"baseline": trained["baseline"], "gate": root / "gate"}
    _, sroot = run_component(
        "calibrate_scrc", scrc_inputs, tmp_path / "c", {"alpha": 0.9, "confidence": "gate"}
    )
    m = verify_dir(sroot / "scrc", "calibrate_scrc")
    assert m.config["scrc"]["confidence"] == "gate" and "gate" in m.inputs


@pytest.mark.slow
def test_sweep_thresholds_component_runs_its_compiled_command(trained, tmp_path):
    out, root = run_component(
        "sweep_thresholds", {"baseline": trained["baseline"]}, tmp_path, {"max_fnr": 0.5}
    )
    m = verify_dir(root / "thresholds")
    assert m.config["sweep"]["max_fnr"] == 0.5
    assert "mcc" in out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert "confusionMatrix" in out["artifacts"]["classification"]["artifacts"][0]["metadata"]
    assert (root / "report").read_text().startswith("# Threshold sweep")


@pytest.mark.slow
def test_calibrate_scrc_component_runs_its_compiled_command_and_export_ships_it(trained, tmp_path):
    out, root = run_component(
        "calibrate_scrc", {"baseline": trained["baseline"]}, tmp_path / "c", {"alpha": 0.9}
    )
    m = verify_dir(root / "scrc", "calibrate_scrc")
    assert m.config["scrc"]["alpha"] == 0.9 and m.config["scrc"]["delta"] == 0.0
    assert "coverage" in out["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert (root / "report").read_text().startswith("# Selective conformal risk control")
    inputs = {"baseline": trained["baseline"], "policy": root / "scrc", "splits": trained["splits"]}
    _, broot = run_component("export_bundle", inputs, tmp_path / "e", {"policy_type": "scrc"})
    assert verify_dir(broot / "bundle", "export_bundle").extra["policy_type"] == "scrc"


@pytest.mark.slow
def test_export_bundle_component_runs_its_compiled_command(trained, tmp_path):
    inputs = {"baseline": trained["baseline"], "policy": trained["policy"], "splits": trained["splits"]}
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
    assert len(executors) == 6  # every container task of the default variant, once
    for config in executors.values():
        assert set(config) <= set(LEGACY_FIELDS)
        for section, entries in config.items():
            for entry in entries if isinstance(entries, list) else [entries]:
                assert set(entry) <= LEGACY_FIELDS[section], (section, entry)
        json_format.ParseDict(config, k8s_pb2.KubernetesExecutorConfig())  # still a valid spec
    assert executors["exec-train-baseline"]["secretAsEnv"][0]["secretName"] == "streetvision-s3"
    assert executors["exec-train-baseline"]["nodeSelector"] == {"labels": {"pool": "gpu"}}
