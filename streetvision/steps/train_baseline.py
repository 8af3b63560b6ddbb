"""train_baseline, ``train_baseline``: a timm backbone + head trained with Lightning, selected on val_select MCC.

Only ``train`` and ``val_select`` reach the optimizer and the stopping rule. After training the best
weights are reloaded and logits for val_select, val_calib and val_test are computed once, on the trainer's
device (each rank its share); rank 0 writes them. With a frozen backbone and no augmentation, backbone
features are computed once, on the device, and the head trains on them (``models.datamodule``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import tempfile
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from streetvision.config import ConfigError, require, to_dict
from streetvision.data.dataset import CLASS_NAMES
from streetvision.errors import StreetVisionError
from streetvision.eval.sweep import SELECTION_THRESHOLD, metrics_at, probabilities
from streetvision.io import store
from streetvision.io.manifests import Manifest, sha256_json
from streetvision.io.outputs import StepOutputs
from streetvision.steps import commit, start

STEP = "train_baseline"
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PRECISIONS = (
    "auto",
    "32-true",
    "32",
    "16-mixed",
    "16",
    "bf16-mixed",
    "bf16",
    "16-true",
    "bf16-true",
    "64-true",
    "64",
)
STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed", "single")
DEVICES = re.compile(r"auto|-1|[1-9][0-9]*|\[\s*[0-9]+(\s*,\s*[0-9]+)*\s*,?\s*\]")
EVAL_SPLITS = ("val_select", "val_calib", "val_test")
CHALLENGE_SPLITS = ("val_calib", "val_test")  # what sweep_thresholds calibrates on and export_bundle reports
AUGMENTS = ("none", "timm", "challenge")
EXPLORA_WEIGHTS = "backbone.safetensors"  # the adapted backbone adapt_explora commits
MAX_BATCH, MAX_WORKERS = 2**20, 256  # beyond these a value is a typo, found before any work


def check_trainer(t) -> None:
    """A training step's trainer section: epochs, accelerator, precision, devices and strategy."""
    require(t.max_epochs >= 1, "trainer.max_epochs", t.max_epochs, "at least 1")
    require(t.accelerator in ACCELERATORS, "trainer.accelerator", t.accelerator, ", ".join(ACCELERATORS))
    require(t.precision in PRECISIONS, "trainer.precision", t.precision, ", ".join(PRECISIONS))
    nodes = getattr(t, "num_nodes", 0)
    require(0 <= nodes <= 65536, "trainer.num_nodes", nodes, "0 (torchrun's, or 1) or a node count")
    if nodes > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:  # nothing would start the other nodes: a hang
        raise ConfigError(f"trainer.num_nodes={nodes}: more than one node needs torchrun on each of them "
                          "(a Kubeflow Trainer TrainJob's pods run it)")  # fmt: skip
    every = getattr(t, "checkpoint_every_n_steps", 0)
    require(
        0 <= every <= 10**9, "trainer.checkpoint_every_n_steps", every, "0 (epoch ends only) or a step count"
    )
    require(
        DEVICES.fullmatch(t.devices.strip()) is not None,
        "trainer.devices",
        t.devices,
        '"auto", a count such as 2, -1 for all, or a list such as [0,1]',
    )
    require(
        t.strategy.split("_")[0] in STRATEGIES,
        "trainer.strategy",
        t.strategy,
        "auto, ddp (and its variants), fsdp, deepspeed or single_device",
    )


@dataclass
class ModelConfig:
    backbone: str = "vit_small_patch14_dinov2.lvd142m"  # any timm model name
    pretrained: bool = True  # load the hub's pretrained weights
    weights: str = ""  # or a local / s3:// weights file for the backbone (overrides the hub)
    freeze_backbone: bool = True
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0


@dataclass
class DataConfig:
    batch_size: int = 32
    num_workers: int = 0
    image_size: int = 0  # 0: the backbone's own input size
    # Local disk for the streamed splits' chunks (half for train, half for the split being evaluated); on
    # Kubeflow the task's ephemeral-storage request covers it.
    cache_bytes: int = 8 * 2**30
    # none, timm (timm's training augmentation) or challenge: random views as the subnet's validator makes
    # them, the default, since serving is judged on those (the README's bench_challenge_calibration:
    # challenge-view reward 0.578 against 0.268 for clean training on make run's demo model)
    augment: str = "challenge"


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    patience: int = 3  # epochs without a better val_select MCC before stopping
    accelerator: str = "auto"
    devices: str = (
        "auto"  # "auto", a count ("2"), or a list ("[0,1]"); under torchrun: its processes per node
    )
    num_nodes: int = 0  # 0: torchrun's node count when launched by it (a TrainJob's pods are), else 1
    strategy: str = "auto"  # e.g. "ddp"
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    cache_features: bool = True  # when the backbone is frozen and augmentation is off
    checkpoint_uri: str = ""  # folder or s3:// prefix: a checkpoint after every epoch, resumed from on rerun
    checkpoint_every_n_steps: int = 0  # also one every n optimizer steps, mid-epoch (0: at epoch ends only)


@dataclass
class EvalConfig:
    # Validator-style challenge views per image of val_calib and val_test (levels spread evenly), whose
    # logits sweep_thresholds can calibrate on and export_bundle reports; 0: none.
    challenge_views: int = 4


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0

    def check(self) -> None:
        m, d, t = self.model, self.data, self.trainer
        require(bool(m.backbone.strip()), "model.backbone", m.backbone, "a timm model name")
        require(0 < m.lr < 10, "model.lr", m.lr, "a learning rate in (0, 10)")
        require(0 <= m.weight_decay < 10, "model.weight_decay", m.weight_decay, "a number in [0, 10)")
        require(0 <= m.dropout < 1, "model.dropout", m.dropout, "a probability in [0, 1)")
        require(0 <= m.warmup_epochs < 1e6, "model.warmup_epochs", m.warmup_epochs, "a number >= 0")
        require(1 <= d.batch_size <= MAX_BATCH, "data.batch_size", d.batch_size, f"1..{MAX_BATCH}")
        require(d.augment in AUGMENTS, "data.augment", d.augment, ", ".join(AUGMENTS))
        require(
            0 <= self.eval.challenge_views <= 64, "eval.challenge_views", self.eval.challenge_views, "0..64"
        )
        require(0 <= d.num_workers <= MAX_WORKERS, "data.num_workers", d.num_workers, f"0..{MAX_WORKERS}")
        require(2**20 <= d.cache_bytes <= 2**50, "data.cache_bytes", d.cache_bytes, "1 MiB..1 PiB")
        require(
            d.image_size == 0 or 16 <= d.image_size <= 4096, "data.image_size", d.image_size, "0 or 16..4096"
        )
        check_trainer(t)
        require(t.patience >= 0, "trainer.patience", t.patience, "0 or more")
        require(0 <= self.seed < 2**32, "seed", self.seed, "an integer in [0, 2^32)")


def _network(config: Config, explora: Path | None):
    """(network, timm architecture arguments, preprocessing) for the configured backbone: its weights
    from adapt_explora's adapted backbone, a weights file, or the hub."""
    from streetvision.models.network import RoadworkNet, architecture, create_backbone, preprocessing

    arch = architecture(config.model.backbone, config.data.image_size)
    with store.local_file(
        str(explora / EXPLORA_WEIGHTS) if explora is not None else config.model.weights
    ) as weights:
        backbone = create_backbone(
            config.model.backbone, pretrained=config.model.pretrained, weights_file=weights, arch=arch
        )
    return RoadworkNet(backbone, config.model.dropout), arch, preprocessing(backbone, config.data.image_size)


def check_explora(explora: Path, config: Config, where: str) -> None:
    """A verified adapt_explora output this training can start from: of the configured backbone."""
    from streetvision.config import read_json

    adapted = read_json(explora / "model.json", StreetVisionError).get("backbone")
    if adapted != config.model.backbone:
        raise StreetVisionError(
            f"--explora {where} adapted {adapted}, but model.backbone is {config.model.backbone}; "
            f"set model.backbone={adapted}"
        )


def run(
    config: Config,
    *,
    shards: str | Path,
    out: Path,
    explora: Path | None = None,
    sources: dict[str, str] | None = None,
    run_id: str | None = None,
    task: str = "",
) -> Manifest | None:
    """Train and commit; returns None on non-zero DDP ranks, which write nothing. ``explora``: adapt_explora's
    output, whose adapted backbone replaces the hub; ``model.weights`` naming an adapt_explora folder or
    ``s3://`` prefix is the same input."""
    weights = config.model.weights
    is_step = weights and (
        store.exists(store.join(weights, "manifest.json")) if store.is_s3(weights) else Path(weights).is_dir()
    )
    if explora is None and is_step:
        with store.staged_step(weights, "adapt_explora") as staged:
            return _train(config, shards=shards, out=out, explora=staged,
                          sources={**(sources or {}), "explora": weights}, run_id=run_id, task=task)  # fmt: skip
    return _train(config, shards=shards, out=out, explora=explora, sources=sources, run_id=run_id, task=task)


def unplaced_trainer(t):
    """The trainer section without where and how often checkpoints are written, which change nothing a
    checkpoint holds: what a checkpoint's identity covers."""
    return dataclasses.replace(t, checkpoint_uri="", checkpoint_every_n_steps=0)


def _identity(config: Config, pack, explora_manifest: Manifest | None) -> str:
    """What a checkpoint must belong to before it is resumed: this config (wherever checkpoints are
    written) and these inputs."""
    unplaced = dataclasses.replace(config, trainer=unplaced_trainer(config.trainer))
    return sha256_json({
        "config": to_dict(unplaced),
        "shards": pack.manifest.self_sha256,
        **({"explora": explora_manifest.self_sha256} if explora_manifest is not None else {}),
    })  # fmt: skip


def _score(net, data, trainer, config: Config, cached: bool):
    """(split -> (logits, labels, rows), split -> the same for its challenge views) of the trained
    network on the evaluation splits, on the trainer's device, each rank its share."""
    from streetvision.models.data import infer

    run_on_device = functools.partial(
        infer,
        batch_size=config.data.batch_size,
        num_workers=config.data.num_workers,
        device=trainer.strategy.root_device,
        precision=str(trainer.precision),
        strategy=trainer.strategy,
    )
    results = {}
    for split in EVAL_SPLITS:
        head_only = cached and split == "val_select"  # its features are cached already
        results[split] = run_on_device(
            net.head if head_only else net, data.features[split] if head_only else data.images(split)
        )
    views = config.eval.challenge_views
    challenged = {
        split: run_on_device(net, data.challenge_views(split, views))
        for split in (CHALLENGE_SPLITS if views else ())
    }
    return results, challenged


def _write_scores(outputs, results, challenged, parts, views: int) -> dict[str, dict]:
    """Write each split's logits, labels and ids (and its challenge views' logits and rows); return the
    metrics at the selection threshold of what is not held out (val_test is evaluated once, by the export)."""
    from streetvision.models.data import view_rows

    per_split = {}
    for split, (logits, labels, idx) in results.items():
        outputs.write_npy(f"logits_{split}.npy", logits.astype(np.float32))
        outputs.write_npy(f"labels_{split}.npy", labels.astype(np.int64))
        outputs.write_json(f"ids_{split}.json", [parts[split][i] for i in idx])
        if split != "val_test":
            per_split[split] = metrics_at(probabilities(logits), labels.astype(int), SELECTION_THRESHOLD)
    for split, (logits, labels, idx) in challenged.items():
        rows = view_rows(len(parts[split]), views)[idx]
        outputs.write_npy(f"logits_{split}_challenge.npy", logits.astype(np.float32))
        outputs.write_npy(f"views_{split}_challenge.npy", rows.astype(np.int64))
        if split == "val_calib":
            per_split["val_calib_challenge"] = metrics_at(
                probabilities(logits), labels.astype(int), SELECTION_THRESHOLD
            )
    return per_split


def _train(
    config: Config,
    *,
    shards: str | Path,
    out: Path,
    explora: Path | None,
    sources: dict[str, str] | None,
    run_id: str | None,
    task: str,
) -> Manifest | None:
    import lightning as L

    from streetvision.data.packed import open_pack
    from streetvision.models.checkpoint import RandomState, joined_history, resume_from
    from streetvision.models.datamodule import FeatureCache, RoadworkData, check_whole_batches
    from streetvision.models.lightning import BestWeights, RoadworkModule
    from streetvision.models.network import decode_side
    from streetvision.models.trainer import build_trainer

    inputs = start(STEP, config, {"shards": shards, "explora": explora}, sources)
    pack = open_pack(shards, inputs.manifests["shards"])
    parts = pack.parts()
    if explora is not None:
        check_explora(explora, config, inputs.src["explora"])
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # Lightning 2.6 calls a torch API that torch 2.14 deprecates, once per fit: noise in every job's log.
    warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", module=r"lightning\.")
    L.seed_everything(config.seed, workers=True, verbose=False)

    net, arch, prep = _network(config, explora)
    cached = config.model.freeze_backbone and config.data.augment == "none" and config.trainer.cache_features
    d, m = config.data, config.model
    streams = tempfile.TemporaryDirectory(prefix="sv-stream-")  # the stream cache, removed with the stack
    data = RoadworkData(pack, prep, decode_side(prep), batch_size=d.batch_size, num_workers=d.num_workers,
                        augment=d.augment, cache=cached, seed=config.seed, cache_dir=Path(streams.name),
                        cache_bytes=d.cache_bytes)  # fmt: skip
    module = RoadworkModule(net, lr=m.lr, weight_decay=m.weight_decay, warmup_epochs=m.warmup_epochs,
                            freeze_backbone=m.freeze_backbone, features_input=cached)  # fmt: skip
    with ExitStack() as stack:
        stack.enter_context(streams)
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sv-logs-")))
        best = BestWeights()
        identity = _identity(config, pack, inputs.manifests.get("explora"))
        trainer = build_trainer(
            config.trainer, [best, FeatureCache(), RandomState()], log_dir, identity, workers=d.num_workers
        )
        if not cached:  # cached features: a plain DataLoader, partial batches kept
            check_whole_batches(len(pack.ids("train")), trainer.world_size, d.batch_size)
        resume = resume_from(config.trainer.checkpoint_uri, identity, Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="sv-resume-"))))  # fmt: skip
        trainer.fit(module, datamodule=data, ckpt_path=resume[0] if resume else None)

        # The best epoch's weights, not the last epoch's; logits on the trainer's device, each rank its share.
        net.load_state_dict(best.state)
        net.to(trainer.strategy.root_device).eval()
        results, challenged = _score(net, data, trainer, config, cached)
        if not trainer.is_global_zero:
            return None
        with StepOutputs(out, STEP) as outputs:
            metrics: dict[str, float | int] = {
                "best_epoch": best.best_epoch,
                "epochs_run": trainer.current_epoch,
            }
            per_split = _write_scores(outputs, results, challenged, parts, config.eval.challenge_views)
            for split, at in per_split.items():
                keys = (
                    ("mcc", "accuracy") if split.endswith("_challenge") else ("mcc", "accuracy", "fnr", "fpr")
                )
                metrics |= {f"{split}_{k}": at[k] for k in keys}
            outputs.write_safetensors("model.safetensors", {k: v.contiguous() for k, v in net.state_dict().items()},
                                      metadata={"backbone": config.model.backbone})  # fmt: skip
            outputs.write_json("model.json", {
                "backbone": config.model.backbone, "architecture": arch, "num_classes": 2, "logit_columns": 1,
                "class_names": CLASS_NAMES, "dropout": config.model.dropout, "preprocessing": prep,
                "decode_min_side": decode_side(prep), "weights": "model.safetensors",
            })  # fmt: skip
            outputs.write_text(
                "history.csv", joined_history(resume[1] if resume else "", log_dir / "metrics.csv")
            )
            for event in sorted((log_dir / "tensorboard").glob("*")):
                outputs.copy(f"tensorboard/{event.name}", event)
            outputs.write_json("metrics.json", per_split)
            extra = {"feature_cache": cached, "precision": str(trainer.precision), "world_size": trainer.world_size,
                     "num_nodes": trainer.num_nodes, "resumed": resume is not None,
                     "cluster_environment": type(trainer.strategy.cluster_environment).__name__
                     if getattr(trainer.strategy, "cluster_environment", None) is not None else None}  # fmt: skip
            return commit(
                outputs,
                config,
                inputs.records() | pack.lineage(),
                metrics,
                run_id=run_id,
                task=task,
                extra=extra,
            )
