"""The Lightning side of training: the module (model logic only) and the callbacks the step uses.

Data lives in plain loaders built by the step; the loop is the Trainer's. Selection and early stopping
both watch ``val_select_mcc``, computed once per epoch over the whole val_select split (gathered across
DDP ranks and de-duplicated by index, since the distributed sampler pads).
"""

from __future__ import annotations

import math
import time

import lightning as L
import numpy as np
import torch
from torch import nn

from streetvision.eval.sweep import SELECTION_THRESHOLD, metrics_at, probabilities
from streetvision.models.network import RoadworkNet

MONITOR = "val_select_mcc"


class RoadworkModule(L.LightningModule):
    def __init__(
        self,
        net: RoadworkNet,
        *,
        lr: float,
        weight_decay: float,
        warmup_epochs: float,
        freeze_backbone: bool,
        features_input: bool,
    ):
        super().__init__()
        self.net = net
        self.lr, self.weight_decay, self.warmup_epochs = lr, weight_decay, warmup_epochs
        self.freeze_backbone, self.features_input = freeze_backbone, features_input
        if freeze_backbone:
            self.net.backbone.requires_grad_(False)
        self.loss = nn.BCEWithLogitsLoss()
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._train: list[tuple[torch.Tensor, int]] = []

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The epoch's losses so far: a training resumed mid-epoch reports the whole epoch's mean, as one
        # that was never stopped does.
        checkpoint["epoch_train_losses"] = [[t, n] for t, n in self._train]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._train = [(t, int(n)) for t, n in checkpoint.get("epoch_train_losses", [])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.head(x) if self.features_input else self.net(x)

    def on_train_epoch_start(self) -> None:
        if self.freeze_backbone:
            self.net.backbone.eval()  # frozen means frozen statistics too (BatchNorm, dropout)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = self.loss(self(x).squeeze(1).float(), y)
        self.log("loss", loss, on_step=True, on_epoch=False, prog_bar=True, logger=False)  # the bar's
        self._train.append((loss.detach() * len(y), len(y)))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, i = batch
        self._val.append((self(x).squeeze(1).float().detach(), y, i))

    def on_validation_epoch_end(self) -> None:
        logits, labels, idx = (torch.cat(t) for t in zip(*self._val, strict=True))
        self._val.clear()
        if self.trainer.world_size > 1:  # shares may differ by one: pad with a repeat, dropped below
            pad = int(self.all_gather(torch.tensor(len(idx), device=idx.device)).max()) - len(idx)
            logits, labels, idx = (torch.cat([t, t[-1:].expand(pad)]) for t in (logits, labels, idx))
            logits, labels, idx = (self.all_gather(t).reshape(-1) for t in (logits, labels, idx))
        idx_np, first = np.unique(idx.cpu().numpy(), return_index=True)  # padded duplicates out
        logits, labels = logits[first], labels[first]
        data = self.trainer.datamodule
        if data is not None and len(idx_np) != len(data.labels("val_select")):  # selection sees all of it
            raise RuntimeError(f"validation scored {len(idx_np)} of {len(data.labels('val_select'))} images")
        metrics = metrics_at(
            probabilities(logits.cpu().numpy()), labels.cpu().numpy().astype(int), SELECTION_THRESHOLD
        )
        self.log(MONITOR, metrics["mcc"], prog_bar=True, sync_dist=False, rank_zero_only=False)
        self.log("val_select_loss", self.loss(logits, labels), sync_dist=False)
        self.log("val_select_accuracy", metrics["accuracy"], sync_dist=False)
        self.log("val_select_n", float(len(idx_np)), sync_dist=False)
        if self._train:  # the epoch's mean training loss, in the same log row as its validation
            total = torch.stack([t.to(self.device) for t, _ in self._train]).sum() / sum(
                n for _, n in self._train
            )
            self.log("train_loss", total, sync_dist=True)
            self._train.clear()

    def configure_optimizers(self):
        """AdamW; the learning rate warms up linearly, then decays to zero on a cosine, per step."""
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return warmup_cosine(optimizer, self.trainer, self.warmup_epochs)


def warmup_cosine(optimizer, trainer: L.Trainer, warmup_epochs: float) -> dict:
    """Lightning's optimizer config: a linear warmup over ``warmup_epochs``, then a cosine to zero, per
    step over the whole training."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    total = max(1, int(trainer.estimated_stepping_batches))
    per_epoch = max(1, total // max(1, trainer.max_epochs or 1))
    warmup = min(total - 1, int(warmup_epochs * per_epoch))
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup), eta_min=0.0)
    if warmup > 0:
        ramp = LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
        schedule = SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
    else:
        schedule = cosine
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class BestWeights(L.Callback):
    """Keep an in-memory copy of ``pl_module.net``'s weights at the best ``monitor`` value (highest, or
    lowest with ``mode="min"``; the first best wins ties).

    In memory rather than a Lightning .ckpt: nothing is pickled, and the step saves safetensors itself.
    """

    def __init__(self, monitor: str = MONITOR, mode: str = "max") -> None:
        self.monitor, self.sign = monitor, 1.0 if mode == "max" else -1.0
        self.best_score = -math.inf
        self.best_epoch = -1
        self.state: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "state": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.best_score, self.best_epoch, self.state = (
            state["best_score"],
            state["best_epoch"],
            state["state"],
        )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        score = self.sign * float(trainer.callback_metrics[self.monitor])
        if score > self.best_score:
            self.best_score, self.best_epoch = score, trainer.current_epoch
            self.state = {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}


class EpochLog(L.Callback):
    """One plain line per epoch, for logs without a progress bar (a container's, Kubeflow's)."""

    def __init__(self) -> None:
        self._t0 = time.time()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.time()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            shown = " ".join(f"{k}={float(v):.4f}" for k, v in trainer.callback_metrics.items())
            print(f"epoch {trainer.current_epoch}: {shown} ({time.time() - self._t0:.1f}s)", flush=True)
