"""adapt_explora, ``adapt_explora``: ExPLoRA, extended self-supervised pre-training of a ViT on street images.

Khanna et al., "ExPLoRA: Parameter-Efficient Extended Pre-Training to Adapt Vision Transformers under
Domain Shifts" (arXiv 2406.10973, ICML 2025). Starting from the pretrained backbone (the hub, or
``model.weights``), the last ``explora.unfrozen_blocks`` blocks train fully, the others get LoRA of rank
``explora.rank`` on Q and V, every LayerNorm trains (``models.lora``), and the backbone's own
self-supervised objective continues: DINO self-distillation with an EMA teacher, centring, multi-crop and
a fresh projection head (``models.dino``). Labels are never read, and only the **train** split's images
(plus ``explora.extra_images``, an unlabelled folder or ``s3://`` prefix) are: val_select, val_calib and
val_test stay unseen. Afterwards the teacher's adapters are merged into its weights, the merged
backbone is checked against the adapted one on real images, and written as a timm-loadable
``backbone.safetensors`` that train_baseline trains on (``train-baseline --explora DIR``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from streetvision.config import require, to_dict
from streetvision.data.dataset import unlabelled_images
from streetvision.io import store
from streetvision.io.manifests import Manifest, sha256_json
from streetvision.io.outputs import StepOutputs
from streetvision.steps import commit, start
from streetvision.steps.train_baseline import (
    EXPLORA_WEIGHTS,
    MAX_BATCH,
    MAX_WORKERS,
    check_trainer,
    unplaced_trainer,
)

STEP = "adapt_explora"
WEIGHTS = EXPLORA_WEIGHTS  # what train_baseline reads of this step's output
MERGE_TOLERANCE = 1e-4  # max |merged − adapted| / (1 + max |adapted|) on real images, in float32


@dataclass
class ModelConfig:
    backbone: str = "vit_small_patch14_dinov2.lvd142m"  # a timm ViT (DINOv2 by default)
    pretrained: bool = True  # start from the hub's pretrained weights
    weights: str = ""  # or a local / s3:// weights file (overrides the hub)


@dataclass
class DataConfig:
    batch_size: int = 32
    num_workers: int = 0
    image_size: int = 0  # global crops' side (0: the backbone's own); a multiple of the patch size
    local_size: int = 0  # local crops' side (0: 3/7 of the global side, rounded to the patch size)
    local_crops: int = 6
    cache_bytes: int = 8 * 2**30  # local disk for the streamed train split


@dataclass
class ExploraConfig:
    rank: int = 0  # LoRA rank on Q and V (0: by width, ViT-L 64, ViT-B 32, ViT-S 16, smaller 8)
    alpha: float = 0.0  # LoRA scale alpha / rank (0: alpha = rank)
    unfrozen_blocks: int = 1  # the last blocks trained fully
    prototypes: int = 4096  # the projection head's output
    head_hidden: int = 2048
    bottleneck: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.04
    warmup_epochs: float = 1.0
    teacher_momentum: float = 0.996  # the EMA's start; it rises to 1 on a cosine
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.999  # DINO's 0.9 assumes batches of 1024 (see the README)
    koleo: float = 0.0  # KoLeo weight (DINOv2 uses 0.1); 0: off
    clip_grad: float = 3.0  # gradient norm clipping, as DINO (0: off)
    gradient_checkpointing: bool = False
    extra_images: str = ""  # an unlabelled folder or s3:// prefix of street images, added to train


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 0  # 0: torchrun's node count when launched by it, else 1 (as train_baseline)
    strategy: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    checkpoint_uri: str = ""  # a checkpoint after every epoch, resumed from on rerun (as train_baseline)
    checkpoint_every_n_steps: int = 0  # also one every n optimizer steps, mid-epoch (0: at epoch ends only)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    explora: ExploraConfig = field(default_factory=ExploraConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0

    def check(self) -> None:
        m, d, e, t = self.model, self.data, self.explora, self.trainer
        require(bool(m.backbone.strip()), "model.backbone", m.backbone, "a timm ViT name")
        require(2 <= d.batch_size <= MAX_BATCH, "data.batch_size", d.batch_size, f"2..{MAX_BATCH}")
        require(0 <= d.num_workers <= MAX_WORKERS, "data.num_workers", d.num_workers, f"0..{MAX_WORKERS}")
        for key, v in (("data.image_size", d.image_size), ("data.local_size", d.local_size)):
            require(v == 0 or 16 <= v <= 4096, key, v, "0 or 16..4096")
        require(0 <= d.local_crops <= 32, "data.local_crops", d.local_crops, "0..32")
        require(0 <= e.rank <= 1024, "explora.rank", e.rank, "0 (the preset) or 1..1024")
        require(0 <= e.alpha < 1e4, "explora.alpha", e.alpha, "0 (= rank) or a positive scale")
        require(e.unfrozen_blocks >= 0, "explora.unfrozen_blocks", e.unfrozen_blocks, "0 or more")
        require(2 <= e.prototypes <= 262144, "explora.prototypes", e.prototypes, "2..262144")
        require(1 <= e.head_hidden <= 65536, "explora.head_hidden", e.head_hidden, "1..65536")
        require(1 <= e.bottleneck <= 65536, "explora.bottleneck", e.bottleneck, "1..65536")
        require(0 < e.lr < 10, "explora.lr", e.lr, "a learning rate in (0, 10)")
        require(0 <= e.weight_decay < 10, "explora.weight_decay", e.weight_decay, "a number in [0, 10)")
        require(0 <= e.warmup_epochs < 1e6, "explora.warmup_epochs", e.warmup_epochs, "a number >= 0")
        for key, v in (
            ("explora.teacher_momentum", e.teacher_momentum),
            ("explora.center_momentum", e.center_momentum),
        ):
            require(0 <= v < 1, key, v, "a momentum in [0, 1)")
        for key, v in (("explora.student_temp", e.student_temp), ("explora.teacher_temp", e.teacher_temp)):
            require(0 < v <= 10, key, v, "a temperature in (0, 10]")
        require(0 <= e.koleo < 100, "explora.koleo", e.koleo, "a weight >= 0")
        require(0 <= e.clip_grad < 1e6, "explora.clip_grad", e.clip_grad, "a norm >= 0 (0: off)")
        check_trainer(t)
        require(0 <= self.seed < 2**32, "seed", self.seed, "an integer in [0, 2^32)")


def ui_outputs(out: Path) -> dict:
    return {}


def _sizes(config: Config, backbone) -> tuple[int, int, int]:
    """(global side, local side, patch size), both sides multiples of the patch size."""
    from streetvision.models.lora import ExploraError

    patch = int(backbone.patch_embed.patch_size[0])
    side = config.data.image_size or int(backbone.patch_embed.img_size[0])
    local = config.data.local_size or max(patch, round(side * 3 / 7 / patch) * patch)
    for key, value in (("data.image_size", side), ("data.local_size", local)):
        if value % patch:
            raise ExploraError(f"{key}={value}: crops must be a multiple of the patch size {patch}")
    return side, local, patch


def run(
    config: Config,
    *,
    shards: str | Path,
    out: Path,
    sources: dict[str, str] | None = None,
    run_id: str | None = None,
    task: str = "",
) -> Manifest | None:
    """Adapt and commit; returns None on non-zero DDP ranks, which write nothing."""
    import lightning as L

    from streetvision.data.packed import open_pack
    from streetvision.models.checkpoint import RandomState, joined_history, resume_from
    from streetvision.models.data import MultiCrop
    from streetvision.models.datamodule import UnlabelledData, check_whole_batches
    from streetvision.models.trainer import build_trainer

    inputs = start(STEP, config, {"shards": shards}, sources)
    pack = open_pack(shards, inputs.manifests["shards"])
    parts = pack.parts()
    e, d = config.explora, config.data
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", module=r"lightning\.")
    L.seed_everything(config.seed, workers=True, verbose=False)
    with ExitStack() as stack:
        extra, extra_files = None, []  # the train split is streamed: never a held-out image
        if e.extra_images:
            root = stack.enter_context(store.local_tree(e.extra_images, prefix="sv-extra-"))
            extra_files, extra_sha = unlabelled_images(root, f"explora.extra_images {e.extra_images}")
            extra = {"uri": e.extra_images, "content_sha256": extra_sha, "images": str(len(extra_files))}
        a = _adapter(config, stack.enter_context(store.local_file(config.model.weights)))
        crops = MultiCrop(a.side, a.local, d.local_crops, a.prep["mean"], a.prep["std"])
        data = UnlabelledData(pack, extra_files, crops, a.side, batch_size=d.batch_size, num_workers=d.num_workers,
                              seed=config.seed, cache_dir=Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sv-stream-"))),
                              cache_bytes=d.cache_bytes)  # fmt: skip
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sv-logs-")))
        identity = sha256_json({
            "config": to_dict(dataclasses.replace(config, trainer=unplaced_trainer(config.trainer))),
            "shards": pack.manifest.self_sha256, "extra": extra,
        })  # fmt: skip
        trainer = build_trainer(config.trainer, [RandomState()], log_dir, identity, monitor=None,
                                clip_grad=e.clip_grad or None, workers=config.data.num_workers)  # fmt: skip
        if not extra_files:  # with extra images, one loader batches the stream and them together
            check_whole_batches(len(pack.ids("train")), trainer.world_size, d.batch_size)
        resume = resume_from(config.trainer.checkpoint_uri, identity, Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="sv-resume-"))))  # fmt: skip
        trainer.fit(a.module, datamodule=data, ckpt_path=resume[0] if resume else None)
        if not trainer.is_global_zero:
            return None
        adapted = a.module.teacher.backbone.float().cpu().eval()  # DINO's teacher: the EMA, what is evaluated
        merged, gap = merge_checked(adapted, data.first(16, a.prep))
        history = joined_history(resume[1] if resume else "", log_dir / "metrics.csv")
    losses = _epoch_losses(history)
    with StepOutputs(out, STEP) as outputs:
        state = {k: v.contiguous() for k, v in merged.state_dict().items()}
        outputs.write_safetensors(WEIGHTS, state, metadata={"backbone": config.model.backbone})
        outputs.write_json("model.json", {
            "backbone": config.model.backbone, "architecture": a.arch, "preprocessing": a.prep, "weights": WEIGHTS,
            "method": "ExPLoRA (arXiv 2406.10973): DINO self-distillation, LoRA on Q,V, unfrozen last blocks",
            "rank": a.rank, "alpha": e.alpha or a.rank, "unfrozen_blocks": e.unfrozen_blocks, "trainable": a.counts,
            "exported": "teacher (EMA), adapters merged", "merge_max_abs_diff": gap,
            "merge_tolerance": MERGE_TOLERANCE, "crops": {"global": [2, a.side], "local": [d.local_crops, a.local]},
            "images": {"train": len(parts["train"]), "extra": int(extra["images"]) if extra else 0},
        })  # fmt: skip
        outputs.write_text("history.csv", history)
        metrics = {
            "trainable_parameters": a.counts["total"], "lora_parameters": a.counts["lora"],
            "first_epoch_loss": losses[0] if losses else float("nan"),
            "last_epoch_loss": losses[-1] if losses else float("nan"),
            "epochs_run": trainer.current_epoch, "merge_max_abs_diff": gap,
        }  # fmt: skip
        return commit(outputs, config, inputs.records() | pack.lineage() | ({"extra_images": extra} if extra else {}),
                      metrics, run_id=run_id, task=task,
                      extra={"precision": str(trainer.precision), "world_size": trainer.world_size,
                             "resumed": resume is not None})  # fmt: skip


class Adapter(NamedTuple):
    """The backbone with ExPLoRA's adapters, in DINO's module, and what its outputs describe."""

    module: Any
    arch: dict
    prep: dict
    side: int
    local: int
    rank: int
    counts: dict


def _adapter(config: Config, weights: Path | None) -> Adapter:
    from streetvision.models.dino import ExploraModule
    from streetvision.models.lora import apply_explora, check_vit, preset_rank
    from streetvision.models.network import architecture, create_backbone, preprocessing

    e = config.explora
    check_vit(config.model.backbone)
    arch = architecture(config.model.backbone, config.data.image_size)
    backbone = create_backbone(config.model.backbone, pretrained=config.model.pretrained, weights_file=weights,
                               arch={**arch, "dynamic_img_size": True})  # fmt: skip
    side, local, _ = _sizes(config, backbone)
    prep = preprocessing(backbone, side)
    rank = e.rank or preset_rank(backbone.num_features)
    counts = apply_explora(backbone, rank=rank, alpha=e.alpha or rank, unfrozen=e.unfrozen_blocks)
    print(f"adapt_explora: {counts['total']:,} trainable backbone parameters ({counts['unfrozen_blocks']:,} in "
          f"{e.unfrozen_blocks} unfrozen block(s), {counts['lora']:,} LoRA r={rank} on Q,V, {counts['norms']:,} "
          "LayerNorm)", flush=True)  # fmt: skip
    if e.gradient_checkpointing:
        backbone.set_grad_checkpointing(True)
    module = ExploraModule(
        backbone, prototypes=e.prototypes, head_hidden=e.head_hidden, bottleneck=e.bottleneck, lr=e.lr,
        weight_decay=e.weight_decay, warmup_epochs=e.warmup_epochs, teacher_momentum=e.teacher_momentum,
        student_temp=e.student_temp, teacher_temp=e.teacher_temp, center_momentum=e.center_momentum,
        koleo_weight=e.koleo, global_crops=2,
    )  # fmt: skip
    return Adapter(module, arch, prep, side, local, rank, counts)


def load_eval(path: Path, prep: dict):
    """One image as the backbone's eval transform gives it."""
    from streetvision.data.images import load_rgb
    from streetvision.models.network import create_transform

    return create_transform(prep)(load_rgb(path, int(prep["input_size"][1])))


def merge_checked(adapted, images: list) -> tuple:
    """(the adapted backbone with its adapters merged, max |merged − adapted| on ``images``); refuses a
    merge that changes the outputs by more than MERGE_TOLERANCE relative to their scale."""
    import torch

    from streetvision.models.lora import ExploraError, merge

    batch = torch.stack(images)
    with torch.no_grad():
        before = adapted(batch)
        merged = merge(copy.deepcopy(adapted))
        after = merged(batch)
    gap = float((after - before).abs().max())
    if not gap <= MERGE_TOLERANCE * (1 + float(before.abs().max())):
        raise ExploraError(f"the merged backbone differs from the adapted one by {gap:.3g} on real images")
    return merged, gap


def _epoch_losses(history: str) -> list[float]:
    import csv

    return [float(r["loss"]) for r in csv.DictReader(history.splitlines()) if r.get("loss")]
