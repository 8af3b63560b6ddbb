"""``python -m pipelines.submit``: upload pipelines/streetvision.yaml to a Kubeflow endpoint and start a run.

The endpoint comes from ``KFP_ENDPOINT`` (e.g. http://localhost:8080 after ``kubectl port-forward``);
run parameters are ``key=value`` arguments, e.g. ``dataset_uri=s3://bucket/roadwork epochs=20``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _value(text: str):
    return yaml.safe_load(text) if text else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", type=Path, default=ROOT / "pipelines" / "streetvision.yaml")
    p.add_argument("--experiment", default="streetvision")
    p.add_argument("--run-name", default=None)
    p.add_argument("--service-account", default="", help="Kubernetes service account for the run's pods")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="re-run every step instead of reusing cached results (Kubeflow caches by inputs and parameters)",
    )
    p.add_argument("params", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    endpoint = os.environ.get("KFP_ENDPOINT")
    if not endpoint:
        print(
            "pipelines.submit: set KFP_ENDPOINT to the Kubeflow Pipelines API (e.g. http://localhost:8080)",
            file=sys.stderr,
        )
        return 2
    params = dict(kv.split("=", 1) for kv in a.params)
    if "dataset_uri" not in params:
        print("pipelines.submit: dataset_uri=s3://bucket/prefix is required", file=sys.stderr)
        return 2
    declared = next(yaml.safe_load_all(a.package.read_text()))["root"]["inputDefinitions"]["parameters"]
    if unknown := sorted(set(params) - set(declared)):
        print(f"pipelines.submit: {unknown[0]} is not a parameter of {a.package.name} (the optional phases "
              f"are chosen by the package: pipelines/streetvision-scrc.yaml, -scrc-gate, -explora); "
              f"its parameters: {', '.join(sorted(declared))}", file=sys.stderr)  # fmt: skip
        return 2
    import tempfile

    import kfp

    client = kfp.Client(host=endpoint)
    with tempfile.TemporaryDirectory(prefix="sv-submit-") as tmp:
        package = without_cache(a.package, Path(tmp) / a.package.name) if a.no_cache else a.package
        run = client.create_run_from_pipeline_package(
            str(package),
            arguments={k: _value(v) for k, v in params.items()},
            experiment_name=a.experiment,
            run_name=a.run_name,
            service_account=a.service_account or None,
        )
    print(f"started run {run.run_id} on {endpoint}")
    return 0


def without_cache(package: Path, out: Path) -> Path:
    """A copy of the compiled pipeline with caching off for every task, in any sub-pipeline too (the SDK's
    ``enable_caching=False`` reaches only the root DAG's tasks)."""
    docs = list(yaml.safe_load_all(package.read_text()))
    spec = docs[0]
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec.get("components", {}).values() if "dag" in c)]
    for dag in dags:
        for task in dag.get("tasks", {}).values():
            task["cachingOptions"] = {**task.get("cachingOptions", {}), "enableCache": False}
    out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
