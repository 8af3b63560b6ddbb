"""Manifests: round trip, lineage fields, redaction, and tampering reported by file name."""

import json

import pytest

from streetvision.io.manifests import MANIFEST, ManifestError, input_record, load_manifest, verify_dir
from streetvision.io.outputs import StepOutputs


@pytest.fixture
def step(tmp_path):
    out = StepOutputs(tmp_path / "step", "make_splits")
    out.write_text("a.txt", "hello")
    out.write_bytes("sub/b.bin", b"\x00" * 1000)
    out.write_json("c.json", {"x": 1})
    out.commit(
        config={"model": {"lr": 0.1}, "aws_secret_access_key": "hunter2", "api_token": "t0k"},
        inputs={"dataset": {"uri": "/data", "sha256": "ab" * 32}},
        metrics={"mcc": 0.5},
        run_id="run-1",
    )
    return tmp_path / "step"


def test_manifest_round_trips_with_lineage(step):
    m = verify_dir(step)
    assert m.step == "make_splits" and m.run_id == "run-1"
    assert set(m.outputs) == {"a.txt", "sub/b.bin", "c.json"}
    assert m.outputs["sub/b.bin"]["size"] == 1000
    assert m.inputs["dataset"]["sha256"] == "ab" * 32
    assert m.metrics == {"mcc": 0.5}
    assert m.code_version and m.config_sha256 and m.duration_s >= 0 and m.python
    assert load_manifest(step).to_dict() == m.to_dict()


def test_secrets_never_reach_the_manifest(step):
    text = (step / MANIFEST).read_text()
    assert "hunter2" not in text and "t0k" not in text
    cfg = json.loads(text)["config"]
    assert cfg["aws_secret_access_key"] == "***" and cfg["model"]["lr"] == 0.1


def test_flipped_byte_is_reported_by_name(step):
    p = step / "sub" / "b.bin"
    data = bytearray(p.read_bytes())
    data[500] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"sub/b.bin: sha256 differs"):
        verify_dir(step)


def test_truncated_file_is_reported_by_name(step):
    (step / "a.txt").write_text("hell")
    with pytest.raises(ManifestError, match=r"a.txt: size 4 != 5"):
        verify_dir(step)


def test_missing_file_is_reported_by_name(step):
    (step / "c.json").unlink()
    with pytest.raises(ManifestError, match=r"c.json: missing"):
        verify_dir(step)


def test_extra_unlisted_file_is_reported_by_name(step):
    (step / "sneaky.py").write_text("print(1)")
    with pytest.raises(ManifestError, match=r"sneaky.py: not listed"):
        verify_dir(step)


def test_directory_without_manifest_does_not_exist(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ManifestError, match="no manifest.json"):
        verify_dir(tmp_path)


def test_manifest_listing_an_escaping_path_is_rejected(step):
    data = json.loads((step / MANIFEST).read_text())
    data["outputs"]["../../etc/passwd"] = {"sha256": "0" * 64, "size": 1}
    (step / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="relative path"):
        verify_dir(step)


def test_input_record_hashes_the_upstream_manifest(step):
    rec = input_record(step, uri="s3://b/step")
    assert rec["uri"] == "s3://b/step" and len(rec["manifest_sha256"]) == 64


@pytest.mark.parametrize(
    "edit,says",
    [
        (lambda text: text.replace('"mcc": 0.5', '"mcc": NaN'), "NaN is not a JSON number"),
        (lambda text: text.replace('"mcc": 0.5', '"mcc": Infinity'), "Infinity is not a JSON number"),
        (
            lambda text: text.replace('"mcc": 0.5', '"mcc": ' + "[" * 100_000 + "]" * 100_000),
            "nested too deeply",
        ),
    ],
)
def test_a_manifest_that_is_not_standard_json_is_refused_in_one_line(step, capsys, edit, says):
    from conftest import run_cli

    path = step / MANIFEST
    path.write_text(edit(path.read_text()))
    with pytest.raises(ManifestError, match=says):
        load_manifest(step)
    code, _, err = run_cli(capsys, ["verify", step])
    assert code == 2 and says in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_json_document_with_nan_or_deep_nesting_is_one_clear_error(tmp_path):
    from streetvision.config import ConfigError, read_json

    (tmp_path / "nan.json").write_text('{"threshold": NaN}')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="NaN is not a JSON number"):
        read_json(tmp_path / "nan.json")
    with pytest.raises(ConfigError, match="nested too deeply"):
        read_json(tmp_path / "deep.json", kind=list)
