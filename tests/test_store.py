"""Object store against a real S3 server (SeaweedFS on 127.0.0.1): round trip, commit rule, clear errors."""

import hashlib
import os

import pytest

from streetvision.io import store
from streetvision.io.manifests import MANIFEST, ManifestError
from streetvision.io.outputs import StepOutputs


def committed(uri):
    try:
        store.verified(uri)
    except (ManifestError, store.StoreError):
        return False
    return True


def make_step(root, big_bytes=0):
    out = StepOutputs(root, "train_baseline")
    out.write_json("metrics.json", {"mcc": 0.7})
    out.write_bytes("nested/small.bin", b"abc")
    if big_bytes:
        out.write_bytes("model.safetensors", os.urandom(big_bytes))
    out.commit(config={"x": 1})
    return root


def test_step_round_trip_with_a_multipart_sized_file(s3, tmp_path):
    src = make_step(tmp_path / "src", big_bytes=40 * store.MiB)  # > 16 MiB multipart threshold
    store.upload_dir(src, s3)
    assert committed(s3)
    m = store.download_dir(s3, tmp_path / "dst")
    assert m.outputs["model.safetensors"]["size"] == 40 * store.MiB
    assert (tmp_path / "dst" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_upload_interrupted_before_the_manifest_is_not_committed(s3, tmp_path):
    src = make_step(tmp_path / "src")
    bucket, prefix = store.split_s3(s3)
    # Objects arrive but the manifest never does (the uploader died before the last object).
    for name in ("metrics.json", "nested/small.bin"):
        store.upload_file(src / name, f"{s3}/{name}")
    assert not committed(s3)
    with pytest.raises(ManifestError, match="not committed"):
        store.download_dir(s3, tmp_path / "dst")


def test_manifest_whose_object_is_missing_is_not_committed(s3, tmp_path):
    src = make_step(tmp_path / "src")
    store.upload_dir(src, s3)
    bucket, prefix = store.split_s3(s3)
    store.client().delete_object(Bucket=bucket, Key=f"{prefix}/metrics.json")
    assert not committed(s3)


def test_tampered_object_fails_verification_after_download(s3, tmp_path):
    src = make_step(tmp_path / "src")
    store.upload_dir(src, s3)
    bucket, prefix = store.split_s3(s3)
    store.client().put_object(Bucket=bucket, Key=f"{prefix}/nested/small.bin", Body=b"abd")
    with pytest.raises(ManifestError, match="nested/small.bin: sha256 differs"):
        store.download_dir(s3, tmp_path / "dst")


def test_wrong_credentials_give_a_clear_error_without_the_secret(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-do-not-print")
    store.reset_clients()
    src = make_step(tmp_path / "src")
    with pytest.raises(store.StoreError) as err:
        store.upload_dir(src, s3)
    msg = str(err.value)
    assert "wrong-secret-do-not-print" not in msg
    assert "AWS_SECRET_ACCESS_KEY" in msg and s3 in msg


def test_local_and_s3_step_contexts_share_one_api(s3, tmp_path):
    with store.output_step(s3, "train_baseline") as local:
        make_step(local)
    with store.local_step(s3) as back:
        assert (back / MANIFEST).is_file()
        assert (back / "nested" / "small.bin").read_bytes() == b"abc"


def test_exists_tells_a_present_object_from_an_absent_one(s3, tmp_path):
    (tmp_path / "a.txt").write_text("a")
    store.upload_file(tmp_path / "a.txt", f"{s3}/a.txt")
    assert store.exists(f"{s3}/a.txt") and not store.exists(f"{s3}/missing.txt")


def test_download_file_commits_atomically_and_hashes_what_it_wrote(s3, tmp_path):
    data = os.urandom(3 * store.MiB)
    (tmp_path / "w.bin").write_bytes(data)
    store.upload_file(tmp_path / "w.bin", f"{s3}/w.bin")
    written = store.download_file(f"{s3}/w.bin", tmp_path / "dst" / "w.bin")
    assert (tmp_path / "dst" / "w.bin").read_bytes() == data
    assert written.size == len(data) and written.sha256 == hashlib.sha256(data).hexdigest()
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["w.bin"]  # no temp file left behind


PARENT_CLIENT = []  # the client a test made before forking; held so that no new one can take its address


def _download_in_a_fork(job):
    worker, uris, digests, root = job
    bad = [u for _ in range(10) for u, d in zip(uris, digests, strict=True)
           if store.download_file(u, f"{root}/{worker}/x").sha256 != d]  # fmt: skip
    return store.client() is PARENT_CLIENT[0], bad


def test_forked_workers_make_their_own_client_and_get_the_bytes_they_asked_for(s3, tmp_path):
    """DataLoader workers are forks: the parent's pooled keep-alive connections would be one socket in two
    processes, each reading the other's responses (measured: 1 download in 240 came back with another's
    bytes, caught only by the pack's SHA-256)."""
    import multiprocessing

    blobs = {f"{s3}/o/{i}": os.urandom(300_000 + i) for i in range(8)}
    for uri, data in blobs.items():
        (tmp_path / "b").write_bytes(data)
        store.upload_file(tmp_path / "b", uri)
    PARENT_CLIENT[:] = [store.client()]
    uris = list(blobs)
    digests = [hashlib.sha256(blobs[u]).hexdigest() for u in uris]
    jobs = [(w, uris[w::2], digests[w::2], tmp_path) for w in range(2)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_download_in_a_fork, jobs)
    assert [inherited for inherited, _ in results] == [False, False]
    assert [bad for _, bad in results] == [[], []]


@pytest.mark.parametrize("endpoint", ["not a url", "http://[::1"])
def test_an_endpoint_that_is_not_a_url_is_one_line_naming_the_variable(monkeypatch, capsys, endpoint):
    from conftest import run_cli

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store.reset_clients()
    try:
        code, _, err = run_cli(capsys, ["verify", "s3://bucket/x"])
    finally:
        store.reset_clients()
    assert code == 2 and "AWS_ENDPOINT_URL_S3" in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_second_writer_of_a_held_prefix_is_refused_in_one_line_naming_the_holder(s3, tmp_path, monkeypatch):
    from streetvision.io import lease

    monkeypatch.setenv("STREETVISION_LEASE_S", "2")
    earlier = make_step(tmp_path / "earlier")
    store.upload_dir(earlier, s3)
    with store.output_step(s3, "train_baseline", "run-a") as local:
        with pytest.raises(lease.LockHeld, match="being written by run run-a .train_baseline on") as err:
            store.output_step(s3, "train_baseline", "run-b").__enter__()
        assert "\n" not in str(err.value)
        with pytest.raises(ManifestError, match="being written by run run-a"):
            store.verified(s3)  # while held, what is there is no commit, even an intact earlier one
        import time

        time.sleep(3)  # longer than the lease: the writer's thread renews it
        assert lease.holder(s3) is not None
        out = StepOutputs(local, "train_baseline")
        out.write_json("metrics.json", {"mcc": 0.9})
        out.commit(config={"x": 2})
    assert lease.holder(s3) is None and lease.LOCK not in store.list_files(s3)
    manifest, _ = store.verified(s3)
    assert manifest.config == {"x": 2} and set(store.list_files(s3)) == {"metrics.json", MANIFEST}


def test_a_killed_writers_lock_runs_out_is_taken_over_and_its_leftovers_removed(s3, tmp_path, monkeypatch):
    from streetvision.io import lease

    monkeypatch.setenv("STREETVISION_LEASE_S", "2")
    store.upload_dir(make_step(tmp_path / "earlier"), s3)
    dead = lease.take(s3, "train_baseline", "killed")
    dead._stop.set()  # a SIGKILLed writer: nobody renews, nobody releases
    bucket, prefix = store.split_s3(s3)
    with pytest.raises(ManifestError, match="being written by run killed"):
        store.verified(s3)
    import time

    time.sleep(3)
    assert store.verified(s3)[0].config == {"x": 1}  # it died before uploading: the earlier commit stands
    # A killed upload: the manifest gone, a partial object there, the lock run out.
    store.client().delete_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")
    store.client().put_object(Bucket=bucket, Key=f"{prefix}/partial.bin", Body=b"half")
    with pytest.raises(ManifestError, match="no manifest"):
        store.verified(s3)
    with store.output_step(s3, "train_baseline", "next") as local:
        assert set(store.list_files(s3)) == {lease.LOCK}  # taken over, leftovers removed before any work
        make_step(local)
    assert store.verified(s3)[0].config == {"x": 1} and "partial.bin" not in store.list_files(s3)


def test_a_writer_that_lost_its_lease_commits_nothing(s3, tmp_path, monkeypatch):
    from streetvision.io import lease

    monkeypatch.setenv("STREETVISION_LEASE_S", "2")
    slow = lease.take(s3, "train_baseline", "paused")
    slow._stop.set()  # paused (a stopped container): its lease runs out
    import time

    time.sleep(3)
    with store.writing(s3, "train_baseline", "other"):
        with pytest.raises(
            store.StreetVisionError, match="lease ran out and the prefix is now held by run other"
        ):
            store.upload_dir(make_step(tmp_path / "late"), s3, slow)
    assert MANIFEST not in store.list_files(s3)


def test_an_output_inside_a_committed_prefix_is_refused(s3, tmp_path):
    store.upload_dir(make_step(tmp_path / "c1"), f"{s3}/c1")
    with pytest.raises(ManifestError, match="lies inside the committed step output"):
        store.check_out(f"{s3}/c1/sub", "make_splits")
    with pytest.raises(ManifestError, match="lies inside the committed step output"):
        store.check_out(f"{s3}/c1/a/b", "make_splits")
    store.check_out(f"{s3}/c2", "make_splits")


def test_a_failed_upload_leaves_its_lock_as_the_mark_of_leftovers_that_the_next_writer_removes(
    s3, tmp_path, monkeypatch
):
    from streetvision.io import lease

    store.upload_dir(make_step(tmp_path / "earlier"), s3)
    real = store._manager

    def broken():
        raise store.StoreError("upload to s3://...: the network went away")

    monkeypatch.setattr(store, "_manager", broken)
    with pytest.raises(store.StoreError, match="network went away"):
        store.upload_dir(make_step(tmp_path / "new"), s3)
    monkeypatch.setattr(store, "_manager", real)
    assert lease.holder(s3) is None and lease.LOCK in store.list_files(s3)  # given up, kept as a mark
    store.check_out(s3, "train_baseline")  # leftovers of a StreetVision writer: may be replaced
    store.upload_dir(make_step(tmp_path / "again"), s3)
    assert committed(s3) and lease.LOCK not in store.list_files(s3)


def test_clean_removes_what_killed_steps_left_and_puts_back_an_earlier_commit(s3, tmp_path, capsys):
    import json
    import socket

    from conftest import run_cli

    from streetvision.io import lease, scratch

    # A killed step's temporary root (its owner, pid 2**22 + 1, is no process), and a live one (ours).
    host = socket.gethostname().replace(".", "_")[:48]
    dead = scratch.base(tmp_path) / f"train_baseline.{host}.{2**22 + 1}.123.abc"
    (dead / "sv-in-x").mkdir(parents=True)
    live = scratch.base(tmp_path) / f"make_splits.{host}.{os.getpid()}.{scratch._started(os.getpid())}.def"
    live.mkdir()
    # A local output whose writer died between its two renames: the commit aside, a staging folder.
    first = make_step(tmp_path / "out")
    aside = tmp_path / ".out.old-killed"
    first.rename(aside)
    (tmp_path / ".out.staging-killed").mkdir()
    # An s3:// output whose upload failed: its lock given up over partial objects.
    bucket, prefix = store.split_s3(s3)
    store.client().put_object(Bucket=bucket, Key=f"{prefix}/partial.bin", Body=b"half")
    store.client().put_object(
        Bucket=bucket,
        Key=f"{prefix}/{lease.LOCK}",
        Body=json.dumps({"run_id": "x", "abandoned": True}).encode(),
    )
    code, out, err = run_cli(capsys, ["clean", "--tmp", tmp_path, tmp_path / "out", s3])
    assert code == 0, err
    report = json.loads(out)
    assert report["temporary_roots_removed"] == [str(dead)] and not dead.exists() and live.exists()
    assert report["outputs"] == {str(tmp_path / "out"): "committed", s3: "leftovers removed"}
    assert store.verify_dir(tmp_path / "out").config == {"x": 1}
    assert not aside.exists() and not (tmp_path / ".out.staging-killed").exists()
    assert store.list_files(s3) == []
