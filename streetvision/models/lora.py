"""ExPLoRA's parameter budget on a timm ViT: the last blocks unfrozen, LoRA on Q and V elsewhere.

Khanna et al., "ExPLoRA" (arXiv 2406.10973, ICML 2025): of a pretrained ViT, the last ``unfrozen``
blocks train fully; every other block gets a rank-r LoRA on its attention's query and value projections
only; every LayerNorm trains; the rest (patch embedding, position embedding, tokens, the other weights)
stays frozen. timm fuses Q, K and V into one ``qkv`` Linear, so :class:`QVLoRA` adds ``B_q A_q x`` to the
Q rows and ``B_v A_v x`` to the V rows of its output and nothing to K: exactly LoRA on Q and V. After
training :func:`merge` folds each adapter into ``qkv.weight``, giving back a plain timm ViT whose state
dict loads into ``timm.create_model`` with the original names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from streetvision.errors import StreetVisionError

# explora.rank=0: the preset by embedding width (ViT-L 1024 -> 64, as in the paper; smaller for smaller).
RANK_PRESETS = ((1024, 64), (768, 32), (384, 16), (0, 8))


class ExploraError(StreetVisionError):
    """A backbone ExPLoRA cannot adapt, or an adapter that does not merge exactly."""


def preset_rank(width: int) -> int:
    return next(rank for at_least, rank in RANK_PRESETS if width >= at_least)


class QVLoRA(nn.Module):
    """A frozen fused ``qkv`` Linear plus rank-r updates of its Q and V outputs (K untouched)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if base.out_features % 3:
            raise ExploraError(f"qkv has {base.out_features} outputs, not three equal parts")
        self.base, self.rank, self.scale = base, rank, alpha / rank
        dim, width = base.in_features, base.out_features // 3
        self.width = width
        self.lora_a_q = nn.Parameter(torch.empty(rank, dim))
        self.lora_b_q = nn.Parameter(torch.zeros(width, rank))
        self.lora_a_v = nn.Parameter(torch.empty(rank, dim))
        self.lora_b_v = nn.Parameter(torch.zeros(width, rank))
        for a in (self.lora_a_q, self.lora_a_v):  # LoRA's init: A like a Linear's weight, B zero
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """The update of the fused weight: [scale·B_q A_q; 0; scale·B_v A_v]."""
        zeros = self.lora_b_q.new_zeros(self.width, self.lora_a_q.shape[1])
        return self.scale * torch.cat([self.lora_b_q @ self.lora_a_q, zeros, self.lora_b_v @ self.lora_a_v])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = (x @ self.lora_a_q.t()) @ self.lora_b_q.t()
        v = (x @ self.lora_a_v.t()) @ self.lora_b_v.t()
        return self.base(x) + self.scale * torch.cat([q, torch.zeros_like(q), v], dim=-1)

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta().to(self.base.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out.to(self.base.weight.device)


def check_vit(name: str) -> None:
    """Refuse, before building it, a timm model that is not a ``VisionTransformer`` (fused qkv)."""
    import timm

    if timm.is_model(name):
        module = timm.models.model_entrypoint(timm.models.get_arch_name(name)).__module__
        if module != "timm.models.vision_transformer":
            raise ExploraError(f"{name} is not a VisionTransformer ({module}): ExPLoRA adapts timm ViTs")


def blocks_of(vit: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a timm ViT, each with a fused ``attn.qkv`` Linear; else ExploraError."""
    blocks = getattr(vit, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not len(blocks):
        raise ExploraError(f"{type(vit).__name__} has no transformer blocks: ExPLoRA adapts timm ViTs")
    for i, block in enumerate(blocks):
        qkv = getattr(getattr(block, "attn", None), "qkv", None)
        if not isinstance(qkv, nn.Linear | QVLoRA):
            raise ExploraError(f"block {i} of {type(vit).__name__} has no fused attn.qkv Linear")
    return blocks


def apply_explora(vit: nn.Module, *, rank: int, alpha: float, unfrozen: int) -> dict[str, int]:
    """Freeze ``vit``, unfreeze its last ``unfrozen`` blocks and every LayerNorm, put LoRA on Q and V of
    the other blocks. Returns the trainable parameter counts by kind."""
    blocks = blocks_of(vit)
    if not 0 <= unfrozen <= len(blocks):
        raise ExploraError(f"explora.unfrozen_blocks={unfrozen}: the backbone has {len(blocks)} blocks")
    vit.requires_grad_(False)
    adapted = len(blocks) - unfrozen
    for block in list(blocks)[:adapted]:
        block.attn.qkv = QVLoRA(block.attn.qkv, rank, alpha)  # new parameters train
    for block in list(blocks)[adapted:]:
        block.requires_grad_(True)
    for module in vit.modules():
        if isinstance(module, nn.LayerNorm):
            module.requires_grad_(True)
    return trainable_counts(vit)


def trainable_counts(vit: nn.Module) -> dict[str, int]:
    """Trainable parameters of an adapted ViT: in unfrozen blocks, LoRA, LayerNorms elsewhere, total."""
    blocks = blocks_of(vit)
    in_blocks = {id(p) for b in blocks if not isinstance(b.attn.qkv, QVLoRA) for p in b.parameters()}
    lora = {
        id(p) for m in vit.modules() if isinstance(m, QVLoRA) for n, p in m.named_parameters() if "lora_" in n
    }
    counts = {"unfrozen_blocks": 0, "lora": 0, "norms": 0, "total": 0}
    for p in vit.parameters():
        if not p.requires_grad:
            continue
        kind = "unfrozen_blocks" if id(p) in in_blocks else "lora" if id(p) in lora else "norms"
        counts[kind] += p.numel()
        counts["total"] += p.numel()
    return counts


def expected_trainable(width: int, depth: int, block_params: int, norm_params: int, *, rank: int,
                       unfrozen: int, final_norm: int) -> int:  # fmt: skip
    """ExPLoRA's budget from a ViT's dimensions: ``unfrozen`` whole blocks, 2·(2·width·rank) LoRA
    parameters (A and B of Q and of V) and the LayerNorms of every other block, and the final norm."""
    return unfrozen * block_params + (depth - unfrozen) * (4 * width * rank + norm_params) + final_norm


def merge(vit: nn.Module) -> nn.Module:
    """Fold every QVLoRA into its ``qkv`` Linear, in place: a plain timm ViT again."""
    for block in blocks_of(vit):
        if isinstance(block.attn.qkv, QVLoRA):
            block.attn.qkv = block.attn.qkv.merged()
    return vit
