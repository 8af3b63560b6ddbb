"""Fault injection on the object store: steps SIGKILLed mid-upload to ``s3://`` (every step kind) and
while checkpointing there, the SeaweedFS server SIGKILLed mid-upload, concurrent writers of one prefix.

The rule of each matrix: a prefix is never taken for a commit unless it is one whole writer's; the
earlier commit survives where the kill came before the upload; the rerun of the same run waits out the
dead writer's lease, takes the prefix over, removes what the dead writer left and commits.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import forkcli
import pytest
from conftest import one_line, run_cli, step_commands
from test_faults_kills import TRAINING

from streetvision.io import store
from streetvision.io.manifests import MANIFEST, ManifestError
from streetvision.io.outputs import StepOutputs

pytestmark = [pytest.mark.faults, pytest.mark.slow]


def test_object_store_killed_mid_upload_leaves_the_step_uncommitted_and_the_rerun_completes(
    tmp_path_factory, tmp_path, monkeypatch, capsys
):
    """The SeaweedFS server SIGKILLed while a step's upload is under way, then restarted, 3 times: the
    prefix is never taken for a commit (by ``verify`` or a reader), and a rerun completes."""
    import seaweed

    server = seaweed.start(tmp_path_factory.mktemp("weed-kill"))
    monkeypatch.setenv("STREETVISION_LEASE_S", "1")
    trials = 0
    try:
        big = StepOutputs(tmp_path / "big", "train_baseline")
        big.write_with("model.safetensors", lambda f: [f.write(os.urandom(1 << 20)) for _ in range(64)])
        big.commit(config={"big": True})
        small = StepOutputs(tmp_path / "small", "train_baseline")
        small.write_bytes("model.safetensors", b"x" * 1000)
        small.commit(config={})
        for trial in range(3):
            for k, v in server.env().items():
                monkeypatch.setenv(k, v)
            store.reset_clients()
            uri = f"s3://{server.bucket}/run{trial}/train_baseline"
            if trial % 2:
                store.upload_dir(tmp_path / "small", uri)  # an earlier commit at the same place
            code = (  # the upload throttled to 32 MiB/s in 8 MiB parts: about two seconds to kill it in
                "from boto3.s3.transfer import TransferConfig; from streetvision.io import store; "
                "store._transfer_config = lambda: TransferConfig(multipart_threshold=8 << 20, "
                "multipart_chunksize=8 << 20, max_concurrency=2, max_bandwidth=32 << 20); "
                f"store.upload_dir({str(tmp_path / 'big')!r}, {uri!r})"
            )
            uploader = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
            deadline = time.time() + 60
            while not _multipart_under_way(uri):  # the big object's parts are going up now
                assert time.time() < deadline and uploader.poll() is None, "the upload never started"
                time.sleep(0.005)
            time.sleep(random.Random(trial).uniform(0.0, 1.0))
            server.kill()
            uploader.kill()
            uploader.wait()
            server = server.restart()
            for k, v in server.env().items():
                monkeypatch.setenv(k, v)
            store.reset_clients()
            with pytest.raises(ManifestError):
                store.verified(uri, "train_baseline")
            code, _, err = run_cli(capsys, ["verify", uri])
            assert code == 2 and one_line(err)
            time.sleep(1.2)  # the dead uploader's lease runs out
            with pytest.raises(ManifestError):
                store.verified(uri, "train_baseline")  # still no commit once nobody holds the prefix
            store.upload_dir(tmp_path / "big", uri)  # the rerun
            manifest, _ = store.verified(uri, "train_baseline")
            assert manifest.config == {"big": True}
            assert set(store.list_files(uri)) == {"model.safetensors", MANIFEST}
            trials += 1
    finally:
        server.stop()
        store.reset_clients()
    print(f"\nobject store SIGKILLed mid-upload: {trials}/{trials} left no commit and the rerun completed")


def _multipart_under_way(uri: str) -> bool:
    bucket, prefix = store.split_s3(uri)
    try:
        return bool(store.client().list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads"))
    except Exception:  # the server between a kill and its restart
        return False


S3_KILLABLE = ("make_splits", "sweep_thresholds", "calibrate_scrc", "export_bundle")


def test_sigkill_mid_upload_to_the_object_store_never_leaves_a_commit_that_lies(world, s3, monkeypatch):
    """Each step kind writing to ``s3://``, SIGKILLed while its upload is under way (twice each, once
    replacing an earlier commit), and a training killed while it writes its checkpoints there: ``verify``
    and the readers refuse the prefix (held, then without a manifest), and the rerun of the same run
    waits out the dead writer's lease, takes the prefix over and commits."""
    monkeypatch.setenv("STREETVISION_LEASE_S", "1")
    rng = random.Random(20261202)
    commands = {stem: argv for stem, argv in step_commands(world).items() if stem in S3_KILLABLE}
    kills = 0
    for trial in range(2 * len(S3_KILLABLE)):
        stem = S3_KILLABLE[trial // 2]
        out, run_id = f"{s3}/k{trial}/{stem}", f"kill-{trial}"
        if trial % 2:
            assert forkcli.wait(forkcli.start([*commands[stem], "--out", out])) == 0
        child = forkcli.start([*commands[stem], "--out", out, "--run-id", run_id], pause=0.4)
        deadline = time.time() + 60
        while not _uploading(out, replacing=bool(trial % 2)):
            assert time.time() < deadline and forkcli.running(child), "the upload never started"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.3))
        child.kill()
        child.join()
        for _ in range(2):  # while the dead writer's lease runs, and after it ran out
            with pytest.raises(ManifestError):
                store.verified(out, stem)
            time.sleep(0.6)
        assert forkcli.wait(forkcli.start([*commands[stem], "--out", out, "--run-id", run_id])) == 0
        manifest, _ = store.verified(out, stem)
        assert set(store.list_files(out)) == {*manifest.outputs, MANIFEST}  # nothing of the killed writer
        kills += 1
    print(f"\nSIGKILL mid-upload to s3:// ({', '.join(S3_KILLABLE)}): {kills}/{kills} never verified, "
          "and the rerun committed")  # fmt: skip


def _uploading(uri: str, replacing: bool) -> bool:
    """Whether a writer of ``uri`` is past the point of no return: the earlier manifest gone, or an
    output object there."""
    names = set(store.list_files(uri))
    return store.LOCK in names and (MANIFEST not in names if replacing else bool(names - {store.LOCK}))


@pytest.mark.parametrize("stem", TRAINING)
def test_a_training_step_killed_mid_upload_to_the_object_store_commits_only_on_its_rerun(
    world, s3, monkeypatch, stem
):
    """Each training step writing to ``s3://``, SIGKILLed while its outputs go up (after the training): the
    prefix never verifies, and the same run's retry waits out the lease and commits exactly its objects."""
    monkeypatch.setenv("STREETVISION_LEASE_S", "1")
    out, argv = (
        f"{s3}/{stem}",
        [*step_commands(world)[stem], "--out", f"{s3}/{stem}", "--run-id", f"kill-{stem}"],
    )
    child = forkcli.start(argv, pause=0.4)  # a child of a server without torch: it imports its own
    deadline = time.time() + 180
    while not _uploading(out, replacing=False):
        assert time.time() < deadline and forkcli.running(child), "the upload never started"
        time.sleep(0.005)
    time.sleep(random.Random(stem).uniform(0.0, 0.3))
    child.kill()
    child.join()
    with pytest.raises(ManifestError):
        store.verified(out, stem)
    assert forkcli.wait(forkcli.start(argv), timeout=180) == 0
    manifest, _ = store.verified(out, stem)
    assert set(store.list_files(out)) == {*manifest.outputs, MANIFEST}


def test_a_training_killed_while_checkpointing_to_the_object_store_resumes_there(world, s3, tmp_path):
    """train_baseline with ``--out`` and ``--checkpoint-root`` on ``s3://``, SIGKILLed once its first
    checkpoint has landed: the output is no commit, and the retried task (same run id) waits out the lease
    and resumes from the checkpoint to a verified commit."""
    argv = [sys.executable, "-m", "streetvision", *step_commands(world)["train_baseline"], "trainer.max_epochs=3",
            "--out", f"{s3}/train_baseline", "--checkpoint-root", f"{s3}/ckpt", "--run-id", "retried"]  # fmt: skip
    env = {**os.environ, "STREETVISION_LEASE_S": "2"}
    proc = subprocess.Popen(
        list(map(str, argv)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    ckpt = f"{s3}/ckpt/retried/train-baseline"
    deadline = time.time() + 120
    while "last.safetensors" not in store.list_files(ckpt):
        assert time.time() < deadline and proc.poll() is None, "no checkpoint landed"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    with pytest.raises(ManifestError):
        store.verified(f"{s3}/train_baseline", "train_baseline")
    r = subprocess.run(list(map(str, argv)), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    manifest, _ = store.verified(f"{s3}/train_baseline", "train_baseline")
    assert manifest.extra["resumed"] is True


def test_concurrent_writers_of_one_s3_output_never_mix_a_commit(world, s3, monkeypatch):
    """Two or three writers of one ``s3://`` output started together, 8 times, half over an earlier
    commit: each ends committed or refused in one line, and what verifies is one writer's whole commit."""
    monkeypatch.setenv("STREETVISION_LEASE_S", "5")
    argv = ["make-splits", "--dataset", world["dataset"]]
    refused = 0
    for trial in range(8):
        out = f"{s3}/c{trial}/make_splits"
        if trial % 2:
            assert forkcli.wait(forkcli.start([*argv, "--out", out, "splits.seed=9"])) == 0
        seeds = (1, 2, 3)[: 2 + trial % 2]
        children = [forkcli.start([*argv, "--out", out, f"splits.seed={seed}"]) for seed in seeds]
        codes = [forkcli.wait(c) for c in children]
        assert set(codes) <= {0, 2} and 0 in codes, codes
        refused += codes.count(2)
        manifest, _ = store.verified(out, "make_splits")
        with store.local_step(out, "make_splits") as local:
            parts = json.loads((local / "splits.json").read_text())
        assert parts["seed"] == manifest.config["splits"]["seed"] in seeds  # files and manifest of one writer
        assert store.LOCK not in store.list_files(out)
    print(f"\nconcurrent s3:// writers: 8/8 trials left one whole commit ({refused} refused with one line)")
