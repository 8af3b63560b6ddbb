"""A copy of the demo dataset whose held-out images (val_calib and val_test) are noise with flipped
labels, and the same split lists committed for it: what a leakage test trains on to show that those
splits never reach a fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from streetvision.data.dataset import dataset_input, load_index
from streetvision.io.outputs import StepOutputs

HELD_OUT = ("val_calib", "val_test")


def poisoned_copy(dataset: Path, splits: Path, root: Path, scramble=HELD_OUT) -> tuple[Path, Path]:
    """(dataset, splits) in ``root``: the images of the ``scramble`` splits replaced by noise and their
    labels flipped; the same split lists, committed for the copy (lineage ties splits to one dataset)."""
    from PIL import Image

    poisoned = root / "poisoned"
    shutil.copytree(dataset, poisoned)
    parts = json.loads((splits / "splits.json").read_text())
    held = {i for name in scramble for i in parts[name]}
    rng = np.random.default_rng(0)
    for image_id in sorted(held):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(poisoned / image_id, "JPEG")
    lines = (poisoned / "labels.csv").read_text().splitlines()
    flipped = [lines[0]] + [
        f"{img},{1 - int(lab)}" if img in held else f"{img},{lab}"
        for img, lab in (ln.split(",") for ln in lines[1:])
    ]
    (poisoned / "labels.csv").write_text("\n".join(flipped) + "\n")
    same = StepOutputs(root / "same_splits", "make_splits")
    same.write_json("splits.json", parts)
    same.commit(config={}, inputs={"dataset": dataset_input(load_index(poisoned))})
    return poisoned, root / "same_splits"
