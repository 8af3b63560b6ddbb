"""DINO self-distillation, the self-supervised objective adapt_explora continues (Caron et al. 2021; DINOv2).

A student (the adapted backbone and a freshly initialised projection head) sees every crop of an image,
global and local; a teacher, an exponential moving average of the student, sees the global crops only.
The student's softmax at temperature ``student_temp`` is pulled towards the teacher's centred, sharpened
softmax (``teacher_temp``) of the *other* global crops; the centre is an EMA of the teacher's batch mean,
which with sharpening keeps the targets from collapsing. KoLeo (Sablayrolles et al. 2019, used by DINOv2)
optionally spreads the student's class tokens. iBOT's masked-patch loss is left out: it needs a mask
token learned with the backbone, and timm's ViTs have none (a fresh one would be trained from scratch by
the very loss it is meant to serve).
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from streetvision.models.lightning import warmup_cosine


class DINOHead(nn.Module):
    """MLP (GELU) -> L2-normalised bottleneck -> weight-normalised linear layer onto ``prototypes``."""

    def __init__(self, width: int, prototypes: int, hidden: int = 2048, bottleneck: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, prototypes, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)  # the norm is fixed at 1, as in DINO
        self.last.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


class DINOLoss(nn.Module):
    """Cross-entropy from the teacher's centred, sharpened global crops to every other student crop."""

    def __init__(self, prototypes: int, *, student_temp: float, teacher_temp: float, center_momentum: float):
        super().__init__()
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, prototypes))

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        targets = [F.softmax((t - self.center) / self.teacher_temp, dim=-1) for t in teacher]
        logs = [F.log_softmax(s / self.student_temp, dim=-1) for s in student]
        total, pairs = 0.0, 0
        for i, target in enumerate(targets):
            for j, log_p in enumerate(logs):
                if i == j:  # the same global view: no distillation onto itself
                    continue
                total = total + torch.sum(-target * log_p, dim=-1).mean()
                pairs += 1
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher: list[torch.Tensor], reduce) -> None:
        """EMA of the teacher's batch mean (``reduce``: the mean across DDP ranks)."""
        batch = reduce(torch.cat(teacher).mean(0, keepdim=True))
        self.center.mul_(self.center_momentum).add_(batch * (1 - self.center_momentum))


def koleo(features: torch.Tensor) -> torch.Tensor:
    """-mean log distance of each L2-normalised feature to its nearest neighbour in the batch."""
    x = F.normalize(features.float(), dim=-1)
    distances = torch.cdist(x, x)
    distances = distances.masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), math.inf)
    return -torch.log(distances.min(dim=1).values + 1e-8).mean()


class Student(nn.Module):
    """Backbone (pooled class token) and projection head."""

    def __init__(self, backbone: nn.Module, head: DINOHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(head outputs, backbone features) per crop; crops of one size go through together."""
        outputs, features, start = [], [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape == crops[start].shape:
                end += 1
            f = self.backbone(torch.cat(crops[start:end]))
            outputs += self.head(f).chunk(end - start)
            features += f.chunk(end - start)
            start = end
        return outputs, features


class ExploraModule(L.LightningModule):
    """Student and EMA teacher; one optimizer over the student's trainable parameters."""

    def __init__(self, backbone: nn.Module, *, prototypes: int, head_hidden: int, bottleneck: int, lr: float,
                 weight_decay: float, warmup_epochs: float, teacher_momentum: float, student_temp: float,
                 teacher_temp: float, center_momentum: float, koleo_weight: float, global_crops: int):  # fmt: skip
        super().__init__()
        self.student = Student(backbone, DINOHead(backbone.num_features, prototypes, head_hidden, bottleneck))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.loss = DINOLoss(
            prototypes, student_temp=student_temp, teacher_temp=teacher_temp, center_momentum=center_momentum
        )
        self.lr, self.weight_decay, self.warmup_epochs = lr, weight_decay, warmup_epochs
        self.base_momentum, self.koleo_weight = teacher_momentum, koleo_weight
        self.global_crops = global_crops

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()  # the teacher's dropout and drop-path stay off

    def training_step(self, batch, batch_idx):
        crops = list(batch)
        with torch.no_grad():
            teacher, _ = self.teacher(crops[: self.global_crops])
            teacher = [t.float() for t in teacher]
        student, features = self.student(crops)
        loss = self.loss([s.float() for s in student], teacher)
        self.log("dino_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        if self.koleo_weight:
            spread = sum(koleo(f) for f in features[: self.global_crops]) / self.global_crops
            self.log("koleo_loss", spread, on_step=False, on_epoch=True, sync_dist=True)
            loss = loss + self.koleo_weight * spread
        self.log("loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True)
        self.loss.update_center(teacher, lambda t: self.trainer.strategy.reduce(t, reduce_op="mean"))
        return loss

    def momentum(self) -> float:
        """The teacher's EMA momentum: from ``teacher_momentum`` to 1 on a cosine over training (DINO)."""
        total = max(1, int(self.trainer.estimated_stepping_batches))
        progress = min(1.0, self.global_step / total)
        return 1 - (1 - self.base_momentum) * (math.cos(math.pi * progress) + 1) / 2

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        ema_update(self.teacher, self.student, self.momentum())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainable(), lr=self.lr, weight_decay=self.weight_decay)
        return warmup_cosine(optimizer, self.trainer, self.warmup_epochs)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum·teacher + (1 − momentum)·student, for every trainable student parameter (the
    frozen ones are equal in both and stay so)."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        if s.requires_grad:
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
