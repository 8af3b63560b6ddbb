"""The Kubeflow Trainer v2 launcher (#23): the TrainJobs it writes against the vendored v2.3.0 CRD, and its
lifecycle (create, adopt, fail, deadline, stop) against a fake API server that refuses what the real one
would (Strict field validation, the CRD's schema and name rule)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import yaml
from conftest import one_line
from fake_k8s import FakeCluster, cel_errors, schema_errors

from streetvision import trainjob
from streetvision.trainjob import JobSpec, LaunchError, job_name, manifest

ROOT = Path(__file__).resolve().parent.parent
VENDORED = ROOT / "manifests" / "trainer" / "v2.3.0"
IMAGE = "registry.example/streetvision-train@sha256:" + "0" * 64
LABELS = {"app.kubernetes.io/managed-by": "streetvision"}


def job(spec: JobSpec | None = None, name: str = "sv-train-baseline-0123456789ab") -> dict:
    return manifest(
        name,
        "team",
        spec or JobSpec(image=IMAGE),
        "train-baseline",
        ["--shards", "s3://b/shards", "--out", "s3://b/o"],
        LABELS,
    )


def test_vendored_files_are_the_upstream_v2_3_0_files():
    table = (VENDORED / "SOURCE.md").read_text()
    for path in sorted(VENDORED.glob("*.yaml")):
        assert hashlib.sha256(path.read_bytes()).hexdigest() in table, path.name
    runtime = yaml.safe_load((VENDORED / "torch_distributed.yaml").read_text())
    assert runtime["metadata"]["name"] == trainjob.RUNTIME
    jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert trainjob.NODE_JOB in {j["name"] for j in jobs}


@pytest.mark.parametrize("spec", [
    JobSpec(image=IMAGE),
    JobSpec(image=IMAGE, nodes=2, procs_per_node=4, gpus_per_node=4),
    JobSpec(image=IMAGE, nodes=2, node_selector={"pool": "gpu"},
            tolerations=({"key": "gpu", "operator": "Exists", "effect": "NoSchedule"},)),
], ids=["1x1-cpu", "2x4-gpu", "placement"])  # fmt: skip
def test_trainjobs_validate_against_the_crd(spec):
    j = job(spec)
    assert schema_errors(j) == [] and cel_errors(j) == []
    trainjob.check(j)
    t = j["spec"]["trainer"]
    assert (t["numNodes"], t["numProcPerNode"]) == (spec.nodes, spec.procs_per_node)
    assert t["command"] == ["torchrun", "-m", "streetvision", "train-baseline"]
    if spec.gpus_per_node:
        assert t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == str(spec.gpus_per_node)
    assert not any("value" in e for e in t["env"])  # credentials only by Secret reference


def test_the_schema_check_refuses_what_the_api_server_refuses():
    j = job()
    j["spec"]["trainer"]["numProcsPerNode"] = 2  # a typo: Strict refuses unknown fields
    assert schema_errors(j)
    j = job()
    j["spec"]["trainer"]["numNodes"] = "2"
    assert schema_errors(j)


@pytest.mark.parametrize("name", ["sv-" + "a" * 61, "SV-Upper", "sv_underscore", "1-leading-digit"])
def test_bad_names_fail_the_crd_rule_and_check(name):
    j = job(name=name)
    assert cel_errors(j)
    with pytest.raises(LaunchError, match="RFC 1035"):
        trainjob.check(j)


def test_torchrun_variables_in_env_are_refused():
    j = job()
    j["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "3"})
    with pytest.raises(LaunchError, match="PET_NNODES"):
        trainjob.check(j)


def test_a_training_image_by_tag_is_refused():
    j = job(JobSpec(image="registry.example/streetvision-train:0.1.0"))
    with pytest.raises(LaunchError, match="not pinned by digest"):
        trainjob.check(j)


@pytest.mark.parametrize(("samples", "world", "batch", "refused"),
                         [(48, 4, 16, True), (48, 4, 12, False), (15, 1, 16, False), (63, 4, 16, True)])  # fmt: skip
def test_a_split_too_small_for_one_batch_a_rank_is_refused(samples, world, batch, refused):
    from streetvision.errors import StreetVisionError
    from streetvision.models.datamodule import check_whole_batches

    if refused:
        with pytest.raises(
            StreetVisionError, match=f"give each of the {world} ranks {samples // world}, less"
        ):
            check_whole_batches(samples, world, batch)
    else:
        check_whole_batches(samples, world, batch)


def test_job_names_are_stable_valid_and_distinct():
    long = job_name("run-1", "train-baseline-" + "x" * 80)
    assert len(long) <= 63 and trainjob.NAME.match(long)
    assert job_name("run-1", "train-baseline") == job_name("run-1", "train-baseline")
    assert job_name("run-1", "train-baseline") != job_name("run-2", "train-baseline")


# The launcher against the fake API server.


def _launch(cluster, out, poll_s=0.02, deadline_s=3600, executor_input=None):
    spec = JobSpec(image=IMAGE, nodes=2, deadline_s=deadline_s)
    trainjob.launch("train-baseline", ["--shards", "s3://b/shards", "--out", out], spec=spec, namespace="team",
                    run_id="run-1", task="train-baseline", out=out, executor_input=executor_input,
                    poll_s=poll_s, api_client=cluster.api_client())  # fmt: skip


def _finish(kind, log="", commit=None):
    """A controller that runs the job in the background: pods, rank 0's log, then the condition."""

    def controller(cluster, j):
        name = j["metadata"]["name"]

        def run():
            pod = cluster.add_pod("team", name, 0, log)
            cluster.add_pod("team", name, 1, "rank 1\n")
            if commit:
                commit()
            cluster.append_log("team", pod, "done\n")
            cluster.set_condition("team", name, kind, f"{kind} by the fake controller")

        threading.Thread(target=run, daemon=True).start()

    return controller


def test_a_completed_job_is_verified_and_its_executor_output_written(trained, s3, tmp_path):
    import json

    from streetvision.io import store

    out = store.join(s3, "train_baseline")
    ei = {"inputs": {}, "outputs": {
        "artifacts": {"baseline": {"artifacts": [{"name": "baseline", "type": {"schemaTitle": "system.Model"},
                                                  "uri": out}]}},
        "outputFile": str(tmp_path / "executor_output.json")}}  # fmt: skip
    commit = lambda: store.upload_dir(trained["baseline"], out)  # noqa: E731
    with FakeCluster(_finish("Complete", "epoch 0\n", commit)) as c:
        _launch(c, out, executor_input=json.dumps(ei))
        assert c.creates() == 1 and c.deletes() == 0
        (created,) = c.jobs.values()
        assert schema_errors(created) == []
    written = json.loads((tmp_path / "executor_output.json").read_text())
    (artifact,) = written["artifacts"]["baseline"]["artifacts"]
    assert artifact["uri"] == out and artifact["metadata"]


def test_complete_without_a_commit_is_an_error(s3):
    from streetvision.io import store

    with FakeCluster(_finish("Complete")) as c, pytest.raises(Exception, match="manifest|commit|no "):
        _launch(c, store.join(s3, "nothing"))


def test_a_failed_job_reports_rank_zeros_error_and_is_deleted(s3):
    log = "epoch 0\nstreetvision train-baseline: error: trainer.num_nodes 3: torchrun started 2 nodes\n"
    with FakeCluster(_finish("Failed", log)) as c:
        with pytest.raises(LaunchError, match="num_nodes 3: torchrun started 2 nodes"):
            _launch(c, "s3://b/o")
        assert c.deletes() == 1


def test_the_deadline_deletes_the_job(s3):
    with FakeCluster() as c:  # no controller: the job never finishes
        with pytest.raises(LaunchError, match="deadline"):
            _launch(c, "s3://b/o", poll_s=0.2, deadline_s=1)
        assert c.creates() == 1 and c.deletes() == 1


def test_a_retry_adopts_the_running_job_and_replaces_a_failed_one(trained, s3):
    from streetvision.io import store

    out = store.join(s3, "train_baseline")
    with FakeCluster() as c:
        j = job(JobSpec(image=IMAGE, nodes=2), name=job_name("run-1", "train-baseline"))
        j["metadata"]["labels"] = {"app.kubernetes.io/managed-by": "streetvision", "streetvision.io/run-id": "run-1",
                                   "streetvision.io/task": "train-baseline"}  # fmt: skip
        j["metadata"]["namespace"] = "team"
        c.jobs[("team", j["metadata"]["name"])] = j  # a launcher killed earlier left it running
        store.upload_dir(trained["baseline"], out)
        c.set_condition("team", j["metadata"]["name"], "Complete")
        _launch(c, out)
        assert c.creates() == 1 and c.deletes() == 0  # the one POST got 409 and the job was adopted

        c.jobs[("team", j["metadata"]["name"])]["status"]["conditions"] = [
            {"type": "Failed", "status": "True", "reason": "Failed", "message": "earlier attempt"}
        ]
        c.controller = _finish("Complete")
        _launch(c, out)
        assert c.deletes() == 1 and c.creates() == 3  # 409, deleted, created again


def test_the_cli_refuses_a_local_out():
    from streetvision.cli import main

    assert main(["launch-trainjob", "--step", "train-baseline", "--out", "/tmp/x", "--image", IMAGE,
                 "--run-id", "r", "--task", "t"]) != 0  # fmt: skip


GOLDEN = Path(__file__).parent / "golden" / "streetvision-trainjob-2x4.yaml"
PINNED = {"STREETVISION_BASE_IMAGE": "ghcr.io/streetvision/streetvision-base@sha256:" + "1" * 64,
          "STREETVISION_TRAIN_IMAGE": "ghcr.io/streetvision/streetvision-train@sha256:" + "2" * 64}  # fmt: skip


def test_compiled_trainjob_pipeline_is_the_golden_file_launches_by_uri_and_pins_the_image(tmp_path, capsys):
    """``make compile COMPILE_ARGS="--trainjob 2x4" BASE_REF=... TRAIN_REF=...``, as the README says; the
    golden file is that command's output (regenerate: the same with ``--output tests/golden/...``)."""
    import os
    import subprocess
    import sys

    from pipelines import compile as compile_

    with pytest.raises(SystemExit):  # a tag: the nodes could pull different images
        compile_.main(["--trainjob", "2x4", "--output", str(tmp_path / "tagged.yaml")])
    assert "is a tag; every node of a TrainJob pulls it" in capsys.readouterr().err
    package = tmp_path / "p.yaml"
    subprocess.run([sys.executable, "-m", "pipelines.compile", "--trainjob", "2x4", "--output", str(package)],
                   env={**os.environ, **PINNED}, cwd=GOLDEN.parent.parent.parent, check=True)  # fmt: skip

    def spec(text):
        return "\n".join(line for line in text.splitlines() if not line.startswith("sdkVersion:"))

    assert spec(package.read_text()) == spec(GOLDEN.read_text()), (
        "tests/golden/streetvision-trainjob-2x4.yaml is stale: regenerate it with the compile command above, --components-dir build/components"
    )
    docs = list(yaml.safe_load_all(package.read_text()))
    executors = docs[0]["deploymentSpec"]["executors"]
    launched = [
        e["container"] for e in executors.values() if "launch-trainjob" in e["container"].get("command", [])
    ]
    assert launched
    for container in launched:
        cmd = container["command"] + container.get("args", [])
        assert "--nodes" in cmd and cmd[cmd.index("--nodes") + 1] == "2"
        assert "--procs-per-node" in cmd and cmd[cmd.index("--procs-per-node") + 1] == "4"
        assert cmd[cmd.index("--image") + 1] == PINNED["STREETVISION_TRAIN_IMAGE"]
        assert container["image"] == PINNED["STREETVISION_BASE_IMAGE"]
        assert not any(
            "{{$.inputs.artifacts" in a and ".path}}" in a for a in cmd
        )  # by URI, never a pod path


# What a TrainJob's pods run: torchrun with only the PET_* variables the torch runtime sets.


def _start(shards, out, tmp_path, nodes, *overrides, per_node=1):
    """``nodes`` torchrun invocations of ``per_node`` processes each, as the TrainJob's nodes, on loopback (gloo);
    each in its own session (a node is killed whole), its stderr in a file."""
    import os
    import subprocess
    import sys

    from conftest import TINY_TRAIN
    from seaweed import free_port

    port = str(free_port())
    procs = []
    for node in range(nodes):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path), "PET_NNODES": str(nodes),
               "PET_NPROC_PER_NODE": str(per_node), "PET_NODE_RANK": str(node), "PET_MASTER_ADDR": "127.0.0.1",
               "PET_MASTER_PORT": port}  # fmt: skip
        argv = [sys.executable, "-m", "torch.distributed.run", "-m", "streetvision", "train-baseline",
                "--shards", shards, "--out", out, *TINY_TRAIN, "trainer.devices=auto", *overrides]  # fmt: skip
        err = open(tmp_path / f"node{node}-{port}.err", "w+")  # noqa: SIM115 - read back in _wait
        procs.append((subprocess.Popen(argv, env=env, stdout=err, stderr=err,
                                       start_new_session=True), err))  # fmt: skip
    return procs


def _wait(procs, timeout=600):
    import os
    import signal
    import subprocess

    done = []
    for p, err in procs:
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            code = p.wait()
        err.seek(0)
        done.append((code, err.read()))
        err.close()
    return done


def _signal_node(agent: int, signum: int) -> None:
    """``signum`` to a node's processes: the torchrun agent's group and its workers, which torchrun starts
    each in a session of its own (a pod's processes, all of them, as a node failure takes them)."""
    import os
    from pathlib import Path

    def parent(stat: Path) -> int:
        try:
            return int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return -1

    workers = [int(s.parent.name) for s in Path("/proc").glob("[0-9]*/stat") if parent(s) == agent]
    for group in (agent, *workers):
        os.killpg(group, signum)


def _nodes(shards, out, tmp_path, nodes, *overrides, per_node=1):
    return _wait(_start(shards, out, tmp_path, nodes, *overrides, per_node=per_node))


@pytest.mark.slow
def test_two_trainjob_nodes_survive_a_killed_node_and_train_once(demo_pack, s3, tmp_path):
    """A TrainJob whose second node is SIGKILLed mid-epoch fails cleanly (rank 0 exits != 0 on the broken
    collective, nothing committed); the rerun of the same job resumes from the checkpoint on the object
    store and commits once, as two nodes of one process under TorchElasticEnvironment."""
    import signal
    import time

    from streetvision.io import store
    from streetvision.models.checkpoint import CHECKPOINT, load

    shards = store.join(s3, "pack_shards")
    store.upload_dir(demo_pack, shards)
    out, ckpt = store.join(s3, "train_baseline"), store.join(s3, "checkpoints")
    # 48 train images over 2 ranks in batches of 4: 6 optimizer steps an epoch, a checkpoint every 2
    settings = ["trainer.max_epochs=4", "trainer.patience=10", "data.batch_size=4",
                "trainer.checkpoint_every_n_steps=2", f"trainer.checkpoint_uri={ckpt}"]  # fmt: skip
    nodes = _start(shards, out, tmp_path, 2, *settings)
    deadline = time.time() + 300
    while not store.exists(store.join(ckpt, CHECKPOINT)):  # the first checkpoint: step 2 of epoch 0
        assert time.time() < deadline and all(p.poll() is None for p, _ in nodes), "no checkpoint was written"
        time.sleep(0.01)
    for p, _ in nodes:
        _signal_node(p.pid, signal.SIGSTOP)
    _signal_node(nodes[1][0].pid, signal.SIGKILL)  # node 1 dies whole: its torchrun agent and its rank
    _signal_node(nodes[0][0].pid, signal.SIGCONT)
    (code, log), _ = _wait(nodes, timeout=300)
    assert code not in (0, -signal.SIGKILL), log[-3000:]  # failed by itself: neither committed nor hung
    assert not store.exists(store.join(out, "manifest.json"))
    last = load(store.download_file(store.join(ckpt, CHECKPOINT), tmp_path / "last.safetensors").path)
    assert last["global_step"] % 6 != 0, last["global_step"]  # the last checkpoint is a mid-epoch one

    ranks = _nodes(shards, out, tmp_path, 2, *settings)
    assert [code for code, _ in ranks] == [0, 0], ranks[0][1][-3000:] + ranks[1][1][-3000:]
    said = f"resuming from the checkpoint at {ckpt} (epoch {last['epoch']}, optimizer step {last['global_step']})"
    assert all(said in log for _, log in ranks)  # every rank resumed the same checkpoint
    m = store.committed_manifest(out, "train_baseline")
    assert m.extra["resumed"] and m.metrics["epochs_run"] == 4
    assert m.extra["world_size"] == 2 and m.extra["num_nodes"] == 2
    assert m.extra["cluster_environment"] == "TorchElasticEnvironment"  # Lightning found torchrun's world


@pytest.mark.slow
def test_two_nodes_of_two_processes_train_once_score_as_one_process_and_a_wrong_num_nodes_fails_in_one_line(
    demo_dataset, demo_pack, s3, tmp_path
):
    """2 nodes x 2 processes: a world of 4, rank 0 commits once. The model cannot equal a single process's
    (four ranks' batches make each optimizer step, another schedule by construction); what must match is
    the committed scores: the 4 ranks' shares of val_test, gathered, are what one process computes with the
    committed model on the same images, in the split's order (no sample dropped or padded twice)."""
    import json

    import numpy as np
    import torch
    from PIL import Image

    from streetvision.data.packed import open_pack
    from streetvision.io import store
    from streetvision.models.network import create_transform, load_network

    shards = store.join(s3, "pack_shards")
    store.upload_dir(demo_pack, shards)
    out = store.join(s3, "train_baseline")
    # 48 train images: 12 a rank, 3 whole batches of 4 (at the suite's 16 a rank had none: refused)
    ranks = _nodes(shards, out, tmp_path, 2, "trainer.max_epochs=1", "eval.challenge_views=0",
                   "data.batch_size=4", per_node=2)  # fmt: skip
    assert [code for code, _ in ranks] == [0, 0], ranks[0][1][-3000:] + ranks[1][1][-3000:]
    m = store.committed_manifest(out, "train_baseline")
    assert m.extra["world_size"] == 4 and m.extra["num_nodes"] == 2
    assert m.extra["cluster_environment"] == "TorchElasticEnvironment"

    got = tmp_path / "committed"
    for name in ("model.safetensors", "model.json", "ids_val_test.json", "logits_val_test.npy"):
        store.download_file(store.join(out, name), got / name)
    info = json.loads((got / "model.json").read_text())
    net = load_network(info["backbone"], dropout=info["dropout"], arch=info["architecture"],
                       weights=got / "model.safetensors", described_by=str(got / "model.json")).eval()  # fmt: skip
    transform = create_transform(info["preprocessing"])
    ids = json.loads((got / "ids_val_test.json").read_text())
    assert ids == open_pack(demo_pack).ids("val_test")  # every sample once, in the split's order
    with torch.no_grad():
        one = net(torch.stack([transform(Image.open(demo_dataset / i).convert("RGB")) for i in ids]))
    logits = np.load(got / "logits_val_test.npy")
    assert logits.shape[0] == len(ids)
    np.testing.assert_allclose(logits.reshape(len(ids), -1), one.numpy().reshape(len(ids), -1), atol=1e-4)

    bad = _nodes(shards, store.join(s3, "wrong"), tmp_path, 2, "trainer.num_nodes=3", per_node=2)
    assert all(code != 0 for code, _ in bad)
    errors = [
        line
        for _, err in bad
        for line in err.splitlines()
        if line.startswith("streetvision train-baseline: error:")
    ]
    assert errors and "num_nodes" in errors[0], bad[0][1][:3000]
    assert not store.exists(store.join(s3, "wrong", "manifest.json"))


def test_sigterm_deletes_the_job_and_a_launcher_killed_outright_is_adopted_by_its_retry(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    def launcher(cluster):
        env = {
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig(tmp_path / "kubeconfig")),
            "POD_NAMESPACE": "team",
        }
        argv = [sys.executable, "-m", "streetvision", "launch-trainjob", "--step", "train-baseline", "--out",
                "s3://b/train_baseline", "--image", IMAGE, "--run-id", "run-9", "--task", "train-baseline",
                "--poll-s", "0.1", "--", "--shards", "s3://b/shards"]  # fmt: skip
        return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def until_created(cluster, p):
        deadline = time.time() + 60
        while not cluster.jobs and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # in its wait loop
        assert cluster.jobs, p.stderr.read() if p.poll() is not None else "no TrainJob created"

    def adopted(cluster):
        """The third launcher got its 409 and is polling the job's pods: it waits on the job it adopted."""
        posts = [i for i, (method, _) in enumerate(cluster.requests) if method == "POST"]
        return len(posts) >= 3 and any("/pods" in path for _, path in cluster.requests[posts[2] :])

    with FakeCluster() as c:
        p = launcher(c)
        until_created(c, p)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
        assert p.returncode != 0 and "stopped (SIGTERM); deleted" in err and one_line(err), err
        assert c.deletes() == 1 and not c.jobs

        p = launcher(c)
        until_created(c, p)
        p.kill()  # no chance to clean up: the TrainJob stays
        p.wait()
        (name,) = (n for _, n in c.jobs)
        p = launcher(c)
        deadline = time.time() + 60
        while not adopted(c) and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)  # Failed before it adopted the job would make it replace the job instead
        c.set_condition("team", name, "Failed", "rank 1 lost")
        p.communicate(timeout=60)
        assert (
            c.creates() == 3 and c.deletes() == 2
        )  # the retry adopted the job (409), then deleted it on Failed
