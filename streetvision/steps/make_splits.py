"""make_splits, ``make_splits``: stratified, seeded train / val_select / val_calib / val_test split of a dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from streetvision.config import load_config, read_json, require
from streetvision.data.dataset import DataError, SourceConfig, dataset_input, load_index, with_content
from streetvision.data.splits import SPLITS, SplitError, stratified_split
from streetvision.io.manifests import Manifest, verify_dir
from streetvision.io.outputs import StepOutputs
from streetvision.steps import commit

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
    source: SourceConfig = field(default_factory=SourceConfig)
    # The dataset's fingerprint when the run was submitted (Kubeflow's fingerprint step), recorded so that
    # Kubeflow's cache key changes when the dataset at the same URI does; not used otherwise.
    dataset_fingerprint: str = ""

    def check(self) -> None:
        r = self.splits.ratios
        ok = len(r) == len(SPLITS) and all(0 < x < 1 for x in r) and abs(sum(r) - 1.0) <= 1e-6
        require(ok, "splits.ratios", r, f"{len(SPLITS)} numbers in (0, 1) summing to 1 ({', '.join(SPLITS)})")
        require(0 <= self.splits.seed < 2**32, "splits.seed", self.splits.seed, "an integer in [0, 2^32)")
        self.source.check()


def run(
    config: Config,
    *,
    dataset: Path,
    out: Path,
    sources: dict[str, str] | None = None,
    run_id: str | None = None,
    task: str = "",
) -> Manifest:
    ds = load_index(dataset, config.source)  # ids and labels, validated before anything is written
    parts = stratified_split(ds.ids, ds.labels, config.splits.ratios, config.splits.seed)
    labels = ds.label_of()
    counts = {
        name: {"total": len(parts[name]), "positive": sum(labels[i] for i in parts[name])} for name in SPLITS
    }
    with StepOutputs(out, STEP) as outputs:
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
        inputs = {"dataset": dataset_input(ds, (sources or {}).get("dataset"))}
        metrics = {f"{name}_images": c["total"] for name, c in counts.items()}
        return commit(outputs, config, inputs, metrics, run_id=run_id, task=task)


# What splits.json holds: the four id lists and how they were made.
SPLITS_KEYS = frozenset(
    {*SPLITS, "seed", "ratios", "counts", "dataset_index_sha256", "dataset_content_sha256"}
)


def load_splits(step_dir: Path) -> dict[str, list[str]]:
    """The four id lists of a verified make_splits directory, checked: lists of unique ids, disjoint."""
    path = Path(step_dir) / SPLITS_FILE
    data = read_json(path, SplitError)
    if not isinstance(data, dict):
        raise SplitError(f"{path}: not a JSON object")
    if unknown := sorted(set(data) - SPLITS_KEYS):
        raise SplitError(f"{path}: unknown field(s) {', '.join(unknown[:5])}")
    parts: dict[str, list[str]] = {}
    for name in SPLITS:
        ids = data.get(name)
        if not (isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids)):
            raise SplitError(f"{path}: {name!r} must be a non-empty list of image ids")
        if len(set(ids)) != len(ids):
            raise SplitError(f"{path}: {name!r} lists an id twice")
        parts[name] = ids
    seen: dict[str, str] = {}
    for name, ids in parts.items():
        for i in ids:
            if i in seen:
                raise SplitError(
                    f"{path}: {i!r} is in both {seen[i]!r} and {name!r}; splits must not overlap"
                )
            seen[i] = name
    return parts


def split_dataset(
    dataset: Path, splits: Path, sources: dict[str, str] | None = None, source=None, *, images: bool = False
):
    """(dataset index, manifest of splits, the four id lists) of a dataset and splits that belong
    together: the splits are a verified make_splits commit made from this dataset's index (its ids and
    labels, read with ``source``, by default the settings the splits were made with), and every id they
    name is in it. ``images``: every image file decoded first and the content identity computed
    (:func:`streetvision.data.dataset.with_content`)."""
    src = sources or {}
    splits_manifest = verify_dir(splits, STEP)
    if source is None:
        made_with = splits_manifest.config.get("source")
        source = load_config(SourceConfig, overrides=_overrides(made_with)) if made_with else SourceConfig()
    ds = load_index(dataset, source)
    made_from = splits_manifest.inputs.get("dataset", {}).get("index_sha256")
    if made_from != ds.index_sha256:
        raise DataError(
            f"--splits {src.get('splits', splits)} were made from a dataset index {str(made_from)[:12]}, "
            f"but --dataset {src.get('dataset', dataset)} has index {ds.index_sha256[:12]} (ids and labels); "
            "make the splits from this dataset, with the same source settings"
        )
    if images:
        ds = with_content(ds)
    parts = load_splits(splits)
    label_of = ds.label_of()
    unknown = [i for ids in parts.values() for i in ids if i not in label_of]
    if unknown:
        raise DataError(
            f"splits name {len(unknown)} id(s) missing from the dataset index (first: {unknown[0]}); "
            "were they made from another dataset?"
        )
    return ds, splits_manifest, parts


def _overrides(settings: dict) -> list[str]:
    """``key=value`` overrides that rebuild a recorded source section."""
    import json

    return [f"{k}={json.dumps(v)}" for k, v in settings.items()]
