"""``python -m pipelines.compile``: write pipelines/streetvision.yaml and components/<stem>.yaml.

Platform options (off by default): ``--gpus N``, ``--node-selector key=value``, ``--toleration
key=value:effect``, ``--s3-secret NAME``. Image references come from components/images.py (environment
overrides ``STREETVISION_REGISTRY``, ``STREETVISION_TAG``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kfp import compiler

from components.export_bundle import export_bundle
from components.make_splits import make_splits
from components.sweep_thresholds import sweep_thresholds
from components.train_baseline import train_baseline
from pipelines.streetvision import PlatformOptions, build_pipeline

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = {
    "make_splits": make_splits,
    "train_baseline": train_baseline,
    "sweep_thresholds": sweep_thresholds,
    "export_bundle": export_bundle,
}


def compile_all(
    pipeline_path: Path, components_dir: Path | None, options: PlatformOptions | None = None
) -> None:
    compiler.Compiler().compile(build_pipeline(options or PlatformOptions()), str(pipeline_path))
    if components_dir is not None:
        for stem, component in COMPONENTS.items():
            compiler.Compiler().compile(component, str(components_dir / f"{stem}.yaml"))


def _toleration(spec: str) -> dict[str, str]:
    kv, _, effect = spec.partition(":")
    key, _, value = kv.partition("=")
    return {
        "key": key,
        "operator": "Equal" if value else "Exists",
        "value": value or None,
        "effect": effect or None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=ROOT / "pipelines" / "streetvision.yaml")
    p.add_argument("--components-dir", type=Path, default=ROOT / "components")
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]")
    p.add_argument("--s3-secret", default=PlatformOptions().s3_secret)
    a = p.parse_args()
    options = PlatformOptions(
        s3_secret=a.s3_secret,
        gpus=a.gpus,
        node_selector=dict(s.split("=", 1) for s in a.node_selector),
        tolerations=[_toleration(t) for t in a.toleration],
    )
    compile_all(a.output, a.components_dir, options)
    print(f"wrote {a.output} and {len(COMPONENTS)} component specs in {a.components_dir}")


if __name__ == "__main__":
    main()
