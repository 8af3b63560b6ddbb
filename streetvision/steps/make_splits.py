"""Phase 0, ``make_splits``: stratified, seeded train / val_select / val_calib / val_test split of a dataset."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from streetvision.config import to_dict, to_yaml
from streetvision.data.dataset import dataset_input, load_index
from streetvision.data.splits import SPLITS, stratified_split
from streetvision.io.manifests import Manifest, StepOutputs

STEP = "make_splits"
SPLITS_FILE = "splits.json"


@dataclass
class SplitsConfig:
    ratios: list[float] = field(
        default_factory=lambda: [0.60, 0.15, 0.15, 0.10]
    )  # train, val_select, val_calib, val_test
    seed: int = 0


@dataclass
class Config:
    splits: SplitsConfig = field(default_factory=SplitsConfig)


def run(
    config: Config,
    *,
    dataset: Path,
    out: Path,
    sources: dict[str, str] | None = None,
    run_id: str | None = None,
) -> Manifest:
    ds = load_index(dataset)  # validates everything before anything is written
    parts = stratified_split(ds.ids, ds.labels, config.splits.ratios, config.splits.seed)
    labels = ds.label_of()
    counts = {
        name: {"total": len(parts[name]), "positive": sum(labels[i] for i in parts[name])} for name in SPLITS
    }
    outputs = StepOutputs(out, STEP)
    outputs.write_json(
        SPLITS_FILE,
        {
            **parts,
            "seed": config.splits.seed,
            "ratios": dict(zip(SPLITS, config.splits.ratios, strict=True)),
            "counts": counts,
            "dataset_index_sha256": ds.index_sha256,
        },
    )
    outputs.write_text("config.yaml", to_yaml(config))
    return outputs.commit(
        config=to_dict(config),
        inputs={"dataset": dataset_input(ds, (sources or {}).get("dataset"))},
        metrics={f"{name}_images": c["total"] for name, c in counts.items()},
        run_id=run_id,
    )


def load_splits(step_dir: Path) -> dict[str, list[str]]:
    """The four id lists from a verified make_splits directory."""
    data = json.loads((Path(step_dir) / SPLITS_FILE).read_text())
    return {name: list(data[name]) for name in SPLITS}
