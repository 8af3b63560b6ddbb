"""The README's runnable snippets, run as written (in a scratch folder, with this environment's tools)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)

# The subnet's registry as its base_miner/registry.py documents it: register_module(name)(cls), then [name].
REGISTRY_STUB = """
class Registry:
    def __init__(self):
        self.data = {}

    def register_module(self, module_name=None):
        def _register(cls):
            self.data[module_name or cls.__name__] = cls
            return cls

        return _register

    def __getitem__(self, key):
        return self.data[key]


DETECTOR_REGISTRY = Registry()
"""


def section(title: str) -> list[tuple[str, str]]:
    """(language, code) of every fenced block under ``## title``."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return FENCE.findall(text[start : end if end > 0 else None])


def test_the_serving_section_has_its_snippets():
    langs = [lang for lang, _ in section("Serving on the subnet")]
    assert langs == ["bash", "python", "python"]


def tool_env(**extra):
    """This environment, with this venv's tools (``streetvision``) first on PATH: what the README assumes."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **extra}


def run_block(lang: str, code: str, cwd, env) -> subprocess.CompletedProcess:
    """One README block as written: bash with errors fatal, or python."""
    cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_the_cli_chain_runs_as_written(tmp_path):
    import json

    (lang, code), *_ = section("The CLI")
    assert lang == "bash" and "export.min_test_mcc=0.2" in code
    r = run_block(lang, code, tmp_path, tool_env())
    assert r.returncode == 0, r.stderr[-3000:]
    policy = json.loads((tmp_path / "runs/x/sweep_thresholds/thresholds.json").read_text())
    bundle = json.loads((tmp_path / "runs/x/export_bundle/bundle.json").read_text())
    assert policy["metrics"]["fnr"] <= 0.2 and bundle["test_metrics"]["mcc"] >= 0.2
    print(
        f"val_calib FPR {policy['metrics']['fpr']:.2f}, held-out challenge MCC {bundle['test_metrics']['mcc']:.2f}"
    )
    assert len(r.stdout.splitlines()) >= 600  # predict: one line per image


@pytest.mark.slow
def test_serving_on_the_subnet_runs_as_written(tmp_path):
    stub = tmp_path / "stub" / "base_miner"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "registry.py").write_text(REGISTRY_STUB)
    env = tool_env(PYTHONPATH=str(tmp_path / "stub"))
    work = tmp_path / "work"
    work.mkdir()
    outputs = []
    for lang, code in section("Serving on the subnet"):
        r = run_block(lang, code, work, env)
        assert r.returncode == 0, f"{lang} block failed:\n{code}\n{r.stderr[-3000:]}"
        outputs.append(r.stdout)
    assert "Held-out evaluation" in outputs[0] and "model.safetensors: OK" in outputs[0]
    served = float(outputs[1].strip().splitlines()[-1])
    assert 0 <= served <= 1
    assert (work / "runs/subnet/hf/model_card.json").is_file()


def _table(header: str) -> list[list[str]]:
    """The rows of the README table whose header row starts with ``header``, cells without backticks."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip().strip("`") for cell in line.strip("|").split("|")])
    return rows


def test_the_variant_and_parameter_tables_are_the_declaration():
    from pipelines.streetvision import VARIANTS, compile_plan
    from streetvision.phases import PARAMETERS

    plans = {name: compile_plan(v) for name, v in VARIANTS.items()}
    variants = _table("| variant (`pipelines/<name>.yaml`)")
    assert [(r[0], r[1], r[2]) for r in variants] == [
        (name, " ".join(v.settings()), " → ".join(plans[name].phases)) for name, v in VARIANTS.items()
    ]
    parameters = _table("| parameter | `streetvision run` setting |")

    def short(name):
        return name.removeprefix("streetvision").lstrip("-") or "default"

    assert [(r[0], r[1], r[2]) for r in parameters] == [
        (name, p.setting, ", ".join(short(v) for v in VARIANTS if name in plans[v].parameters))
        for name, p in PARAMETERS.items()
    ]


def test_the_phase_table_is_the_declaration_in_run_order():
    from streetvision.phases import PHASES

    rows = _table("| stem | optional |")
    assert [(r[0], r[1]) for r in rows] == [(p.stem, "yes" if p.optional else "") for p in PHASES]


def test_the_commands_table_and_the_cli_are_the_makefile_and_the_declaration():
    import re

    from streetvision.phases import PHASES

    makefile = (README.parent / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.M))
    rows = _table("| command | what it does |")
    named = {re.match(r"make ([a-z-]+)", r[0]).group(1) for r in rows}
    assert named <= targets and {"run", "test", "test-fast", "compile", "images"} <= named
    text = README.read_text()
    for p in PHASES:  # every phase's command is shown, as the CLI spells it
        assert f"streetvision {p.command} " in text, p.command
