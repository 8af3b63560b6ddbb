"""``streetvision verify``: check a step directory or a bundle, local or on the object store."""

from __future__ import annotations

from typing import Any

from streetvision.io import store
from streetvision.io.manifests import ManifestError, load_manifest


def verify_path(path: str) -> dict[str, Any]:
    """Verify ``path`` (a step directory or bundle, local or s3://); raise naming what is wrong.

    A step output is verified by its manifest (required, a plain file, covering every file and its own
    fields); a bundle is an ``export_bundle`` output whose ``bundle.json`` is then checked as every loader
    checks it.
    """
    from streetvision.bundle import BUNDLE_FILE, verify_bundle
    from streetvision.publish import STEP as EXPORT_HF
    from streetvision.steps import STEPS

    with store.local_step(path) as root:
        manifest = load_manifest(root)
        if manifest.step not in {*STEPS, EXPORT_HF}:
            raise ManifestError(f"{path}: names step {manifest.step!r}, which this version does not know")
        report: dict[str, Any] = {
            "ok": True,
            "path": path,
            "step": manifest.step,
            "files": len(manifest.outputs),
        }
        if manifest.step == "export_bundle" or (root / BUNDLE_FILE).exists():
            report["bundle_files"] = len(verify_bundle(root)["files"])
        return report
