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
    store.client.cache_clear()
    src = make_step(tmp_path / "src")
    with pytest.raises(store.StoreError) as err:
        store.upload_dir(src, s3)
    msg = str(err.value)
    assert "wrong-secret-do-not-print" not in msg
    assert "AWS_SECRET_ACCESS_KEY" in msg and s3 in msg


def test_local_and_s3_step_contexts_share_one_api(s3, tmp_path):
    with store.output_step(s3) as local:
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


@pytest.mark.parametrize("endpoint", ["not a url", "http://[::1"])
def test_an_endpoint_that_is_not_a_url_is_one_line_naming_the_variable(monkeypatch, capsys, endpoint):
    from conftest import run_cli

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store.client.cache_clear()
    try:
        code, _, err = run_cli(capsys, ["verify", "s3://bucket/x"])
    finally:
        store.client.cache_clear()
    assert code == 2 and "AWS_ENDPOINT_URL_S3" in err and err.count("\n") == 1 and "Traceback" not in err
