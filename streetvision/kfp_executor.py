"""The one module that knows Kubeflow Pipelines' executor JSON.

Components pass ``{{$}}`` (the executor input) as ``--executor-input``. After a step has committed, this
module writes the executor output (``outputs.outputFile``) so the Kubeflow UI shows the step's results:
Metrics scalars, ClassificationMetrics (confusion matrix and ROC, in the shapes the KFP SDK's
``ClassificationMetrics.log_confusion_matrix`` / ``log_roc_curve`` produce), and a Markdown report.
Every declared output artifact is listed, and an output parameter ``<artifact>_uri`` carries that
artifact's URI (a streamed phase's readers take it instead of the artifact). It needs no KFP install: the base image carries no kfp.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

from streetvision.data.dataset import CLASS_NAMES
from streetvision.errors import StreetVisionError
from streetvision.io import atomic
from streetvision.io.manifests import MANIFEST, Manifest

_MOUNTS = {"gs://": "/gcs/", "minio://": "/minio/", "s3://": "/s3/"}


def local_path(uri: str) -> str:
    """Where the KFP launcher mounts an artifact URI inside the container (as kfp.dsl.Artifact.path)."""
    for scheme, mount in _MOUNTS.items():
        if uri.startswith(scheme):
            return mount + uri[len(scheme) :]
    return uri


def parse(executor_input: str) -> dict[str, Any]:
    try:
        data = json.loads(executor_input)
        output_file = Path(data["outputs"]["outputFile"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise StreetVisionError(
            f"--executor-input is not a KFP executor input ({type(e).__name__}: {e})"
        ) from None
    folder = next((p for p in [output_file.parent, *output_file.parent.parents] if p.exists()), Path("/"))
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):  # found now, not after the work
        raise StreetVisionError(
            f"--executor-input: its outputFile {output_file} cannot be written ({folder})"
        )
    return data


def _scalars(manifest: Manifest) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in manifest.metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def confusion_and_roc(metrics: dict[str, int], roc: dict[str, list[float]]) -> dict[str, Any]:
    """ClassificationMetrics metadata: the confusion matrix (rows: true class) and ROC points."""
    return {
        "confusionMatrix": {
            "annotationSpecs": [{"displayName": c} for c in CLASS_NAMES],
            "rows": [{"row": [metrics["tn"], metrics["fp"]]}, {"row": [metrics["fn"], metrics["tp"]]}],
        },
        "confidenceMetrics": [
            {"confidenceThreshold": t, "recall": r, "falsePositiveRate": f}
            for f, r, t in zip(roc["fpr"], roc["tpr"], roc["threshold"], strict=True)
        ],
    }


def _artifact_metadata(
    schema: str, path: str, out: Path, manifest: Manifest, declared: dict[str, Any]
) -> dict[str, Any]:
    """What the UI shows for one declared output; ``declared`` is the step's own ``ui_outputs(out)``:
    the ClassificationMetrics metadata and the Markdown report's file name."""
    if schema == "system.Metrics":
        scalars = _scalars(manifest)
        atomic.write_json(path, scalars)
        return scalars
    if schema == "system.ClassificationMetrics":
        meta = declared["classification"]
        atomic.write_json(path, meta)
        return meta
    if schema in ("system.Markdown", "system.HTML"):
        report = out / declared["report"] if "report" in declared else None
        atomic.write_text(path, report.read_text() if report else f"# {manifest.step}\n")
        return {}
    # The step directory itself (Model, Artifact, Dataset): identify it by its manifest.
    digest = atomic.compute_file_sha256(out / MANIFEST)
    return {"step": manifest.step, "manifest_sha256": digest, "code_version": manifest.code_version}


def write_executor_output(executor_input: str, out: Path, manifest: Manifest | None) -> Path | None:
    """Write ``outputs.outputFile``; returns its path (None on non-zero DDP ranks, which committed nothing)."""
    if manifest is None:
        return None
    data = parse(executor_input)
    step = importlib.import_module(f"streetvision.steps.{manifest.step}")
    declared = step.ui_outputs(out) if hasattr(step, "ui_outputs") else {}
    artifacts: dict[str, Any] = {}
    for name, entry in data["outputs"].get("artifacts", {}).items():
        runtime = entry["artifacts"][0]
        schema = runtime.get("type", {}).get("schemaTitle", "system.Artifact")
        metadata = _artifact_metadata(schema, local_path(runtime["uri"]), out, manifest, declared)
        artifacts[name] = {
            "artifacts": [{"name": runtime.get("name", name), "uri": runtime["uri"], "metadata": metadata}]
        }
    # A streamed output's URI, for its readers to stream from (an artifact input would be copied whole).
    uris = {
        name: entry["artifacts"][0]["uri"] for name, entry in data["outputs"].get("artifacts", {}).items()
    }
    parameters = {name: uris[name[: -len("_uri")]] for name in data["outputs"].get("parameters", {})
                  if name.endswith("_uri") and name[: -len("_uri")] in uris}  # fmt: skip
    output_file = Path(data["outputs"]["outputFile"])
    atomic.write_json(output_file, {"artifacts": artifacts, "parameterValues": parameters})
    return output_file
