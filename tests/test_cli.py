"""The CLI: help, version, verify, one-line errors, and no torch at startup."""

import subprocess
import sys

from streetvision.io.outputs import StepOutputs


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "streetvision", *args], capture_output=True, text=True, **kw)


def test_help_lists_every_phase():
    r = cli("--help")
    assert r.returncode == 0
    for cmd in (
        "make-splits",
        "train-baseline",
        "sweep-thresholds",
        "export-bundle",
        "verify",
        "predict",
        "run",
    ):
        assert cmd in r.stdout


def test_version_prints_the_package_version():
    from streetvision import __version__

    r = cli("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_verify_exits_zero_only_when_everything_matches(tmp_path):
    out = StepOutputs(tmp_path, "make_splits")
    out.write_text("splits.json", "{}")
    out.commit(config={})
    assert cli("verify", str(tmp_path)).returncode == 0
    (tmp_path / "splits.json").write_text("{} ")
    r = cli("verify", str(tmp_path))
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "splits.json" in r.stderr and "Traceback" not in r.stderr


def test_cli_startup_and_verify_do_not_import_torch(tmp_path):
    out = StepOutputs(tmp_path, "make_splits")
    out.commit(config={})
    code = (
        "import sys; from streetvision.cli import main; rc = main(['verify', sys.argv[1]]);"
        "assert 'torch' not in sys.modules, 'torch was imported'; raise SystemExit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_bad_arguments_get_one_line_errors_not_tracebacks(tmp_path):
    for args, message in (
        (("demo-data", "--out", str(tmp_path / "d"), "--n", "4"), "8 to 1,000,000 images"),
        (("verify", "s3://"), "s3 URI without a bucket"),
    ):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "d" / "labels.csv").exists()
