"""A synthetic phase-1 directory (committed, with a manifest) holding given val_calib logits and labels."""

from __future__ import annotations

import numpy as np

from streetvision.io.outputs import StepOutputs


def fake_phase1(root, logits, labels, *, test_logits=None, test_labels=None):
    out = StepOutputs(root, "train_baseline")
    out.write_npy("logits_val_calib.npy", np.asarray(logits))
    out.write_npy("labels_val_calib.npy", np.asarray(labels))
    if test_logits is not None:
        out.write_npy("logits_val_test.npy", np.asarray(test_logits))
        out.write_npy("labels_val_test.npy", np.asarray(test_labels))
    out.commit(config={})
    return root


def separable_logits(n=400, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    logits = (labels * 2.0 - 1.0) + rng.normal(0, noise, n)
    return logits.astype(np.float32)[:, None], labels


def reseal(root):
    """Rewrite a step's manifest to match its files as they are now (a consistent re-signing, which
    verification cannot catch without signatures): what is left to catch is the content's own checks."""
    import json
    from pathlib import Path

    from streetvision.io.atomic import compute_file_sha256
    from streetvision.io.manifests import MANIFEST, Manifest

    root = Path(root)
    data = json.loads((root / MANIFEST).read_text())
    for name in data["outputs"]:
        if (root / name).is_file():
            data["outputs"][name] = {
                "sha256": compute_file_sha256(root / name),
                "size": (root / name).stat().st_size,
            }
    (root / MANIFEST).write_text(json.dumps(Manifest(**data).sealed().to_dict()))
    return root
