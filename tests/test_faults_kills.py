"""Fault injection, kills and concurrency on disk: SIGKILLed steps of every kind, concurrent writers.
(The object store's own: ``test_faults_store.py``.)

The rule of each matrix: a killed step leaves no manifest or one that verifies, never a commit that lies;
the earlier commit survives where there was one; what the killed step left in temporary folders is gone
after the rerun; and the rerun succeeds. Two writers of one output never produce a mixed commit.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import forkcli
import pytest
from conftest import step_commands

from streetvision.io.manifests import verify_dir
from streetvision.io.outputs import StepOutputs

pytestmark = [pytest.mark.faults, pytest.mark.slow]


TRAINING = ("train_baseline", "train_gate", "adapt_explora")  # torch's threads do not survive a fork


def kill_commands(world) -> dict[str, list]:
    return {stem: argv for stem, argv in step_commands(world).items() if stem not in TRAINING}


def check_after_kill(out: Path, stem: str, had_commit: bool) -> None:
    if out.exists():
        verify_dir(out, stem)  # never a folder that does not verify
    assert out.exists() or not had_commit, "a kill destroyed the previous commit"


def test_sigkill_at_random_moments_leaves_no_manifest_or_a_verified_one_and_the_rerun_succeeds(
    world, tmp_path, monkeypatch
):
    rng = random.Random(20261129)
    commands = kill_commands(world)
    scratch = tmp_path / "tmp"  # the forked steps' temporary folder: what a killed one leaves stays here
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    durations = {}
    for stem, argv in commands.items():
        t0 = time.time()
        assert forkcli.wait(forkcli.start([*argv, "--out", tmp_path / "timing" / stem])) == 0
        durations[stem] = time.time() - t0
    trials = 0
    # Every step kind four times, at random moments: twice a first commit, twice a replacement of one.
    schedule = [(stem, had_commit) for stem in sorted(commands) for had_commit in (False, True, False, True)]
    rng.shuffle(schedule)
    for trial, (stem, had_commit) in enumerate(schedule):
        out = tmp_path / f"k{trial}" / stem
        if had_commit:
            assert forkcli.wait(forkcli.start([*commands[stem], "--out", out])) == 0
        child = forkcli.start([*commands[stem], "--out", out])
        time.sleep(rng.uniform(0, durations[stem] * 1.2))
        child.kill()
        child.join()
        check_after_kill(out, stem, had_commit)
        assert forkcli.wait(forkcli.start([*commands[stem], "--out", out])) == 0
        verify_dir(out, stem)
        assert not [p.name for p in out.parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]
        assert left_behind(scratch) == [], "the rerun left the killed step's temporary folders"
        trials += 1
    print(f"\nSIGKILL trials ({', '.join(sorted(commands))}): {trials}/{trials} clean; "
          f"runtimes {', '.join(f'{k} {v:.2f}s' for k, v in durations.items())}")  # fmt: skip


@pytest.mark.parametrize("stem", TRAINING)
def test_sigkill_during_training_leaves_no_manifest_and_the_rerun_succeeds(world, tmp_path, stem):
    rng = random.Random(7)
    argv = [sys.executable, "-m", "streetvision", *step_commands(world)[stem]]
    out = tmp_path / stem
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}  # what a killed process cannot clean stays here
    (tmp_path / "tmp").mkdir()
    killed: list[str] = []
    for _ in range(3):
        before = set(left_behind(tmp_path / "tmp"))
        proc = subprocess.Popen(
            [*map(str, argv), "--out", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.time() + 60
        while not set(left_behind(tmp_path / "tmp")) - before:  # killed inside the step, once its root exists
            assert time.time() < deadline and proc.poll() is None, "the step never started"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 3.0))
        proc.kill()
        proc.wait()
        check_after_kill(out, stem, False)
        killed += left_behind(tmp_path / "tmp")  # a root the killed step could not remove (or none, if done)
    r = subprocess.run([*map(str, argv), "--out", str(out)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    verify_dir(out, stem)
    assert not [p.name for p in tmp_path.iterdir() if ".staging-" in p.name]
    assert killed and left_behind(tmp_path / "tmp") == []  # the rerun removed what the killed runs left


def left_behind(tmp: Path) -> list[str]:
    """Temporary folders of steps under ``tmp``: their roots, and any ``sv-*`` made outside one."""
    return sorted(p.name for p in tmp.glob("streetvision-*/*")) + sorted(p.name for p in tmp.glob("sv-*"))


def test_concurrent_writers_of_one_output_never_mix_a_commit(world, tmp_path):
    argv = ["make-splits", "--dataset", world["dataset"]]
    refused = 0
    for trial in range(24):
        out = tmp_path / f"c{trial}" / "make_splits"
        # In every other trial a third writer is mid-commit (it holds the lock) while the two start.
        held = StepOutputs(out, "make_splits") if trial % 2 else None
        children = [forkcli.start([*argv, "--out", out, f"splits.seed={seed}"]) for seed in (1, 2)]
        codes = [forkcli.wait(c) for c in children]
        if held is not None:
            assert codes == [2, 2], codes  # both refused: one line each, nothing written
            held.write_json("splits.json", {"seed": 0})
            held.commit(config={"splits": {"seed": 0}})
        else:
            assert set(codes) <= {0, 2} and 0 in codes, codes
        refused += codes.count(2)
        manifest = verify_dir(out, "make_splits")
        parts = json.loads((out / "splits.json").read_text())
        assert parts["seed"] == manifest.config["splits"]["seed"]  # files and manifest from one writer
    print(
        f"\nconcurrent writers: 24/24 trials left one whole commit ({refused} writers refused with one line)"
    )
