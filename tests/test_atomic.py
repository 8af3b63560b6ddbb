"""Atomic IO: hashes match the bytes written, and a writer killed at any moment leaves no partial file."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from streetvision.io import atomic
from streetvision.io.manifests import MANIFEST, ManifestError, verify_dir
from streetvision.io.outputs import StepOutputs


def test_write_returns_sha256_and_size_of_the_bytes_on_disk(tmp_path):
    data = os.urandom(3 * atomic.CHUNK + 17)
    w = atomic.write_bytes(tmp_path / "a.bin", data)
    assert w.size == len(data)
    assert w.sha256 == hashlib.sha256(data).hexdigest() == atomic.compute_file_sha256(tmp_path / "a.bin")


def test_json_npy_and_safetensors_writes_hash_what_they_wrote(tmp_path):
    for w in (
        atomic.write_json(tmp_path / "a.json", {"b": 1, "a": [1.5]}),
        atomic.write_npy(tmp_path / "a.npy", np.arange(10, dtype=np.float32)),
        atomic.write_safetensors(tmp_path / "a.safetensors", {"w": np.ones((3, 2), np.float32)}),
    ):
        assert w.sha256 == atomic.compute_file_sha256(w.path)
        assert w.size == w.path.stat().st_size
    assert np.load(tmp_path / "a.npy", allow_pickle=False).tolist() == list(range(10))


def test_object_arrays_are_refused_because_they_would_need_pickle(tmp_path):
    with pytest.raises(TypeError, match="pickle"):
        atomic.write_npy(tmp_path / "a.npy", np.array([{"x": 1}], dtype=object))
    assert not (tmp_path / "a.npy").exists()


def test_an_exception_while_writing_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "keep.txt"
    atomic.write_text(target, "old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic.write_with(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


WRITER = r"""
import os, sys
from streetvision.io.outputs import StepOutputs
root = sys.argv[1]
i = 0
while True:
    out = StepOutputs(root, "crashy")
    for k in range(3):
        payload = bytes([i % 251]) * (200_000 + 50_000 * k)
        out.write_bytes(f"part{k}.bin", payload)
    out.write_json("meta.json", {"i": i})
    out.commit(config={"i": i})
    i += 1
"""


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_partial_file_or_a_lying_manifest(tmp_path):
    rng = random.Random(1234)
    trials = 25
    for trial in range(trials):
        root = tmp_path / f"t{trial}"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)])
        time.sleep(rng.uniform(0.3, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for f in root.glob("part*.bin"):
            data = f.read_bytes()
            k = int(f.stem[-1])
            assert len(data) == 200_000 + 50_000 * k, f"partial file under final name: {f}"
            assert len(set(data)) == 1, f"mixed content in {f}"
        if (root / "meta.json").exists():
            json.loads((root / "meta.json").read_text())
        if (root / MANIFEST).exists():
            verify_dir(root)  # any manifest that exists vouches only for what is there


def test_a_rerun_leaves_the_previous_commit_whole_until_it_commits_and_then_replaces_it(tmp_path):
    root = tmp_path / "step"
    out = StepOutputs(root, "s")
    out.write_text("a.txt", "1")
    out.write_text("old-only.txt", "x")
    out.commit(config={})
    rerun = StepOutputs(root, "s")
    rerun.write_text("a.txt", "2")
    assert verify_dir(root, "s").outputs.keys() == {"a.txt", "old-only.txt"}  # still the old commit
    with pytest.raises(ManifestError, match="another process is writing"):
        StepOutputs(root, "s")  # a second writer of the same output fails instead of mixing files
    rerun.commit(config={})
    assert verify_dir(root, "s").outputs.keys() == {"a.txt"} and (root / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step.lock", "step"]  # no staging left


class Killed(BaseException):
    """Stands for a SIGKILL at one point of a commit: nothing after it runs, no cleanup either."""


@pytest.mark.parametrize("exchange_works", [True, False])
def test_a_kill_at_any_point_of_a_replacing_commit_loses_neither_commit(
    tmp_path, monkeypatch, exchange_works
):
    """Replacing a commit swaps two folders. Where the system has an atomic exchange there is no moment
    without a commit; with two renames, a kill between them leaves the output folder gone and the earlier
    commit aside, and the next writer (or ``streetvision clean``) puts it back before anything else."""
    import streetvision.io.outputs as outputs_module

    root = tmp_path / "step"
    first = StepOutputs(root, "s")
    first.write_text("a.txt", "1")
    first.commit(config={})
    if not exchange_works:
        monkeypatch.setattr(outputs_module, "exchange", lambda a, b: False)
    real_rename, renames = os.rename, []

    def rename_then_die(src, dst):  # the first rename happens; the process dies before the second
        renames.append((src, dst))
        if len(renames) == 2:
            raise Killed
        real_rename(src, dst)

    monkeypatch.setattr(outputs_module.os, "rename", rename_then_die)
    monkeypatch.setattr(outputs_module.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    rerun = StepOutputs.__new__(StepOutputs)  # a writer whose cleanup never runs, as under SIGKILL
    rerun.__init__(root, "s")
    rerun.write_text("a.txt", "2")
    with pytest.raises(Killed):
        StepOutputs.commit(rerun, config={})
    rerun._lock.release()  # the kernel drops a killed process's flock
    monkeypatch.undo()
    if exchange_works:
        assert (root / "a.txt").read_text() == "2" and verify_dir(root, "s")  # swapped in one step
    else:
        assert not root.exists() and len(renames) == 2  # the moment the old code lost both
        StepOutputs(root, "s").abort()  # the next writer puts the earlier commit back first
        assert (root / "a.txt").read_text() == "1" and verify_dir(root, "s")
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name]


def test_names_outside_the_directory_are_refused(tmp_path):
    out = StepOutputs(tmp_path / "o", "s")
    for bad in ("../x", "/etc/passwd", "a/../../b", ""):
        with pytest.raises(ValueError, match="relative"):
            out.write_text(bad, "x")
    assert not (tmp_path / "x").exists()
