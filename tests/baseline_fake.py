"""A synthetic train_baseline directory (committed, with a manifest) holding given val_calib logits and labels."""

from __future__ import annotations

import numpy as np

from streetvision.io.outputs import StepOutputs


def fake_baseline(root, logits, labels, *, test_logits=None, test_labels=None, challenge=True):
    """With ``challenge``, each split also has one challenge view per image whose logit is the clean one
    (levels 0-3 in turn), so a sweep on either view gives the same policy."""
    out = StepOutputs(root, "train_baseline")
    splits = {"val_calib": (logits, labels)}
    if test_logits is not None:
        splits["val_test"] = (test_logits, test_labels)
    for split, (lg, lb) in splits.items():
        out.write_npy(f"logits_{split}.npy", np.asarray(lg))
        out.write_npy(f"labels_{split}.npy", np.asarray(lb))
        if challenge:
            rows = np.arange(len(np.asarray(lb)))
            out.write_npy(f"logits_{split}_challenge.npy", np.asarray(lg))
            out.write_npy(f"views_{split}_challenge.npy", np.stack([rows, rows % 4], axis=1))
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


def fake_gate(root, baseline, calib_scores, test_scores=None):
    """A committed train_gate output for ``baseline`` holding given gate scores of val_calib (and val_test),
    the challenge views' being the clean ones (as :func:`fake_baseline` makes them)."""
    from streetvision.io.manifests import input_record

    out = StepOutputs(root, "train_gate")
    splits = {"val_calib": calib_scores, **({"val_test": test_scores} if test_scores is not None else {})}
    for split, scores in splits.items():
        out.write_npy(f"gate_{split}.npy", np.asarray(scores, dtype=np.float32))
        out.write_npy(f"gate_{split}_challenge.npy", np.asarray(scores, dtype=np.float32))
    out.commit(config={}, inputs={"baseline": input_record(baseline)})
    return root
