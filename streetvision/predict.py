"""``streetvision predict``: classify images with a verified bundle, one JSON line per image.

Weights come from safetensors (no pickle); preprocessing and policy come from ``bundle.json``. An image
that cannot be read is reported on its own line and the batch goes on; the exit code is 1 if any failed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from streetvision.bundle import policy_outputs, read_gate_info, verify_bundle
from streetvision.data.dataset import IMAGE_SUFFIXES
from streetvision.errors import StreetVisionError
from streetvision.eval import sweep
from streetvision.io import store

BATCH = 32


class Predictor:
    """A loaded, verified bundle: network, preprocessing and policy, ready for one image or a batch.

    ``Predictor.from_bundle(path)`` verifies the bundle (a folder or an ``s3://`` prefix) once and keeps
    the network in memory; ``predictor(image)`` returns the served probability of one PIL image, the
    float a StreetVision miner answers with.
    """

    def __init__(self, root: Path, device: str = "cpu"):
        import torch

        from streetvision.models.network import create_transform, load_network

        self.bundle = verify_bundle(root)
        b = self.bundle
        self.device = torch.device(device if device == "cpu" or torch.cuda.is_available() else "cpu")
        self.net = load_network(
            b["backbone"],
            dropout=b["model"]["dropout"],
            arch=b["model"]["architecture"],
            weights=root / b["model"]["weights"],
            described_by=f"{root / 'bundle.json'}",
        ).to(self.device)
        self.gate = None
        if gate := b["policy"].get("gate"):  # an scrc policy that answers by train_gate's gate
            from safetensors.torch import load_file

            from streetvision.models.gate import build_gate

            self.gate = build_gate(read_gate_info(root / gate["config"]))
            self.gate.load_state_dict(load_file(root / gate["weights"]), strict=True)
            self.gate.to(self.device).eval()
        self.transform = create_transform(b["preprocessing"])
        self.min_side = int(b["decode_min_side"])
        self.policy = b["policy"]
        self.threshold = float(self.policy["params"]["threshold"])
        self._torch = torch

    @classmethod
    def from_bundle(cls, path: str | Path, device: str = "cpu") -> Predictor:
        """Verify and load the bundle at ``path`` (folder or ``s3://``); the files are not read again."""
        with store.staged_step(str(path), "export_bundle") as root:  # verified by __init__
            return cls(root, device)

    def scores(self, images: Sequence[Any]) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw P(roadwork) per image, defined as the sweep defines it on the same logits (the policy may
        calibrate it: :func:`bundle.policy_outputs`), and the gate's P(decision right) for a gate policy."""
        torch = self._torch
        with torch.no_grad():
            batch = torch.stack([self.transform(im) for im in images]).to(self.device)
            features = self.net.backbone(batch)
            logits = self.net.head(features).float()
            gate = None
            if self.gate is not None:
                gate = torch.sigmoid(self.gate(features, logits.reshape(-1))).cpu().numpy()
            return sweep.probabilities(logits.cpu().numpy()), gate

    def decide(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """The policy's outputs (:func:`bundle.policy_outputs`) for a batch of RGB images."""
        return policy_outputs(self.policy["type"], self.policy["params"], *self.scores(images))

    def __call__(self, image: Any) -> float:
        """The served probability of one PIL image: above 0.5 exactly when the policy says roadwork."""
        from PIL import ImageOps

        rgb = ImageOps.exif_transpose(image).convert("RGB")
        return float(self.decide([rgb])["served"][0])


def expand(inputs: Sequence[str]) -> list[Path]:
    """The image files named by files and folders; refuses ``s3://`` inputs and an empty result."""
    files: list[Path] = []
    for item in inputs:
        if store.is_s3(item):
            raise StreetVisionError(
                f"{item}: predict reads local images; copy them from the object store first"
            )
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        else:
            files.append(p)
    if not files:
        raise StreetVisionError(
            f"no images in {', '.join(inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


def predict_files(
    predictor: Predictor, files: Sequence[Path], served: bool = False
) -> Iterator[dict[str, Any]]:
    from PIL import Image

    from streetvision.data.images import load_rgb

    names = predictor.bundle["class_names"]
    selective = predictor.policy["type"] == "scrc"
    for start in range(0, len(files), BATCH):
        rows: list[dict[str, Any]] = []
        images = []
        for f in files[start : start + BATCH]:
            try:
                images.append(load_rgb(f, predictor.min_side))
                rows.append({"id": str(f)})
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                rows.append({"id": str(f), "error": f"unreadable image: {type(e).__name__}: {e}"})
        if images:
            out = predictor.decide(images)
            readable = iter(
                zip(
                    *(out[k].tolist() for k in ("probability", "decision", "answered", "served")), strict=True
                )
            )
            for row in rows:
                if "error" not in row:
                    p, d, answered, s = next(readable)
                    # scrc: "defer" below its confidence threshold; the served probability still cuts at the
                    # decision threshold, for a consumer that needs an answer for every image.
                    row |= {"probability": p, "decision": names[d] if answered else "defer"}
                    if served or selective:
                        row["served_probability"] = s
        yield from rows


def predict_cli(bundle: str, inputs: Sequence[str], served: bool = False) -> int:
    files = expand(inputs)
    with store.staged_step(bundle, "export_bundle") as root:  # Predictor verifies it
        predictor = Predictor(root)
        failures = 0
        for row in predict_files(predictor, files, served):
            failures += "error" in row
            print(json.dumps(row), flush=True)
    if failures:
        print(f"streetvision predict: {failures} image(s) could not be read", file=sys.stderr)
    return 1 if failures else 0
