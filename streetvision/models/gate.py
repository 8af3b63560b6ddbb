"""train_gate's network: a small MLP that scores whether train_baseline's decision on an image is right.

Its input is what train_baseline already computes for an image: the frozen backbone's pooled features, the
roadwork logit, and the margin |2·served − 1| from the decision threshold (calibrate_scrc's plain
confidence), standardised with the training rows' mean and spread (buffers, saved with the weights). Its
output is one logit of P(decision correct); calibrate_scrc answers an image when the sigmoid of it reaches
lambda. The train_baseline network is never changed.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch import nn

from streetvision.eval.metrics import auroc
from streetvision.eval.sweep import risk_coverage

# What selects and early-stops the gate: the area under val_select's risk-coverage curve (lower is
# better), the ranking calibrate_scrc's answering threshold acts on (the loss also rewards mere calibration).
MONITOR = "val_select_gate_aurc"


class GateNet(nn.Module):
    """[features, logit, margin], standardised -> a logistic term in the margin plus an MLP (Linear ->
    GELU -> Dropout -> Linear) whose last layer starts at zero.

    So the gate starts as a monotone function of the margin (the plain confidence, which it must beat)
    and learns from the features only what val_select's early stopping keeps.
    """

    def __init__(self, num_features: int, hidden: int, dropout: float, threshold: float):
        super().__init__()
        width = num_features + 2
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))
        self.register_buffer("threshold", torch.tensor(min(max(float(threshold), 1e-6), 1 - 1e-6)))
        self.margin = nn.Linear(1, 1)
        nn.init.ones_(self.margin.weight)  # rising with the margin, as the plain confidence does
        nn.init.zeros_(self.margin.bias)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def inputs(self, features: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        z = logit.reshape(-1, 1).to(features.dtype)
        p, t = torch.sigmoid(z), self.threshold
        # |2·served − 1| of bundle.served_probability, in torch.
        margin = torch.where(p >= t, (p - t) / (1 - t), (t - p) / t)
        return torch.cat([features, z, margin], dim=1)

    def standardise_on(self, features: torch.Tensor, logit: torch.Tensor) -> None:
        """Fix the input standardisation to the mean and spread of these (training) rows."""
        x = self.inputs(features.float(), logit.float())
        self.mean.copy_(x.mean(0))
        self.scale.copy_(x.std(0, unbiased=False).clamp_min(1e-6))

    def forward(self, features: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        x = (self.inputs(features.float(), logit.float()) - self.mean) / self.scale
        return (self.margin(x[:, -1:]) + self.mlp(x)).squeeze(1)


def build_gate(info: dict) -> GateNet:
    """The gate that ``model.json`` (train_gate's, or a bundle's ``gate.json``) describes."""
    return GateNet(int(info["num_features"]), int(info["hidden"]), float(info["dropout"]), info["threshold"])


class GateModule(L.LightningModule):
    """Binary cross-entropy on (features, logit, correct); val_select's loss and AUROC once per epoch."""

    def __init__(self, net: GateNet, *, lr: float, weight_decay: float):
        super().__init__()
        self.net, self.lr, self.weight_decay = net, lr, weight_decay
        self.loss = nn.BCEWithLogitsLoss()
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        features, logit, correct = batch
        loss = self.loss(self.net(features, logit), correct)
        self.log("train_gate_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        features, logit, correct = batch
        self._val.append((self.net(features, logit).detach(), correct))

    def on_validation_epoch_end(self) -> None:
        scores, correct = (torch.cat(t) for t in zip(*self._val, strict=True))
        self._val.clear()
        s, c = scores.cpu().numpy(), correct.cpu().numpy().astype(int)
        self.log(MONITOR, risk_coverage(s, c).aurc, prog_bar=True)
        self.log("val_select_gate_loss", self.loss(scores, correct))
        self.log("val_select_gate_auroc", auroc(s, c))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)


@torch.no_grad()
def gate_scores(gate: GateNet, features: np.ndarray, logits: np.ndarray, batch: int = 4096) -> np.ndarray:
    """P(train_baseline's decision is right) per row, on the CPU."""
    gate = gate.cpu().eval()
    f = torch.from_numpy(np.asarray(features, np.float32))
    z = torch.from_numpy(np.asarray(logits, np.float32))
    out = [torch.sigmoid(gate(f[i : i + batch], z[i : i + batch])) for i in range(0, len(f), batch)]
    return torch.cat(out).numpy().astype(np.float32) if out else np.zeros(0, np.float32)
