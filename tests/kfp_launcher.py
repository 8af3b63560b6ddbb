"""What the KFP launcher does to a compiled container command line, for contract tests.

It substitutes the placeholders the launcher substitutes (artifact paths, parameter values, ``{{$}}``) and
resolves ``{"Concat": [...]}`` / ``{"IfPresent": ...}`` arguments, from the compiled component spec.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

PLACEHOLDER = re.compile(
    r"\{\{\$\.(inputs|outputs)\.(artifacts|parameters)\['([^']+)'\](?:\.(path|uri|output_file))?\}\}"
)
MOUNTS = {"gs://": "/gcs/", "minio://": "/minio/", "s3://": "/s3/"}  # the launcher's LocalPathForURI


def local_path(uri: str) -> str:
    """Where the launcher puts an artifact of this URI in the pod (what ``.path`` is)."""
    scheme = next((s for s in MOUNTS if uri.startswith(s)), None)
    return MOUNTS[scheme] + uri[len(scheme) :] if scheme else uri


def load_component(path: Path) -> dict[str, Any]:
    spec = yaml.safe_load(path.read_text())
    (comp,) = spec["components"].values()
    (executor,) = spec["deploymentSpec"]["executors"].values()
    return {"spec": comp, "container": executor["container"]}


def _param_text(value: Any) -> str:
    """A parameter as the Go launcher prints it (strconv.FormatFloat(v, 'f', -1, 64) for numbers)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else json.dumps(value)


JOB_ID = "0f1e2d3c-run-of-the-contract-tests"


def command_line(
    component: dict[str, Any],
    inputs: dict[str, Path],
    outputs_root: Path,
    parameters: dict[str, Any] | None = None,
    task: str = "task",
    output_uris: dict[str, str] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """(argv, executor_input) with every placeholder replaced as the launcher would. ``output_uris``: an
    output artifact's URI as a cluster's pipeline root makes it (``s3://...``; default: a folder under
    ``outputs_root``, as kfp.local makes it); its ``.path`` is then the launcher's mount of it."""
    spec = component["spec"]
    params = {
        k: v.get("defaultValue") for k, v in spec.get("inputDefinitions", {}).get("parameters", {}).items()
    }
    params |= parameters or {}
    out_defs = spec.get("outputDefinitions", {}).get("artifacts", {})
    in_defs = spec.get("inputDefinitions", {}).get("artifacts", {})
    out_uris = {name: str(outputs_root / name) for name in out_defs} | (output_uris or {})
    out_params = spec.get("outputDefinitions", {}).get("parameters", {})
    executor_input = {
        "inputs": {
            "artifacts": {
                n: {
                    "artifacts": [
                        {"name": n, "uri": str(inputs[n]), "type": in_defs[n]["artifactType"], "metadata": {}}
                    ]
                }
                for n in in_defs
                if n in inputs  # an optional input artifact not given is absent
            },
            "parameterValues": params,
        },
        "outputs": {
            "artifacts": {
                n: {"artifacts": [{"name": n, "uri": out_uris[n], "type": d["artifactType"]}]}
                for n, d in out_defs.items()
            },
            "parameters": {n: {"outputFile": str(outputs_root / "parameters" / n)} for n in out_params},
            "outputFile": str(outputs_root / "executor_output.json"),
        },
    }

    def substitute(text: str) -> str:
        if text == "{{$}}":
            return json.dumps(executor_input)
        text = text.replace("{{$.pipeline_job_uuid}}", JOB_ID).replace("{{$.pipeline_task_name}}", task)

        def one(m: re.Match) -> str:
            direction, kind, name, attribute = m.groups()
            if kind == "parameters":
                if direction == "outputs":
                    return executor_input["outputs"]["parameters"][name]["outputFile"]
                return _param_text(params[name])
            if direction == "inputs":
                return str(inputs[name])
            return out_uris[name] if attribute == "uri" else local_path(out_uris[name])

        return PLACEHOLDER.sub(one, text)

    def resolve(arg: Any) -> list[str]:
        if isinstance(arg, str) and arg.startswith("{"):
            try:
                arg = json.loads(arg)
            except json.JSONDecodeError:
                return [substitute(arg)]
        if isinstance(arg, dict) and "Concat" in arg:
            return ["".join(part for a in arg["Concat"] for part in resolve(a))]
        if isinstance(arg, dict) and "IfPresent" in arg:
            branch = arg["IfPresent"]
            chosen = (
                branch.get("Then", [])
                if params.get(branch["InputName"]) is not None or branch["InputName"] in inputs
                else branch.get("Else", [])
            )
            return [part for a in (chosen if isinstance(chosen, list) else [chosen]) for part in resolve(a)]
        return [substitute(arg)]

    container = component["container"]
    argv = [part for a in [*container["command"], *container.get("args", [])] for part in resolve(a)]
    outputs_root.mkdir(parents=True, exist_ok=True)  # the launcher makes each output's parent folder
    return argv, executor_input
