"""``streetvision verify``: check a step directory or a bundle, local or on the object store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streetvision.io import store
from streetvision.io.manifests import MANIFEST, verify_dir


def _verify_local(path: Path) -> dict[str, Any]:
    from streetvision.bundle import BUNDLE_FILE, verify_bundle

    report: dict[str, Any] = {"ok": True, "path": str(path)}
    if (path / BUNDLE_FILE).is_file():
        report["bundle_files"] = len(verify_bundle(path)["files"])
    if (path / MANIFEST).is_file() or "bundle_files" not in report:
        manifest = verify_dir(path)
        report.update(step=manifest.step, files=len(manifest.outputs))
    return report


def verify_path(path: str) -> dict[str, Any]:
    """Verify ``path`` (a step directory or bundle, local or s3://); raise naming what is wrong."""
    with store.local_tree(path, prefix="sv-verify-") as root:
        return {**_verify_local(root), "path": path}
