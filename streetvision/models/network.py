"""The classifier network: a timm backbone (pooled features) and a dropout + linear head with one logit."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from streetvision.errors import StreetVisionError


class ModelError(StreetVisionError):
    """A backbone name or weights file cannot be used."""


def architecture(name: str, image_size: int = 0) -> dict[str, Any]:
    """The ``timm.create_model`` arguments, beyond the name, that fix the network's shape.

    A model with a fixed input size (ViTs: their position embeddings) is built for the size it will see;
    timm resamples pretrained position embeddings to match. Recorded in ``model.json`` and the bundle, so
    ``predict`` rebuilds exactly the trained network.
    """
    import timm

    cfg = timm.get_pretrained_cfg(name) if timm.is_model(name) else None
    if (
        image_size
        and cfg is not None
        and cfg.fixed_input_size
        and tuple(cfg.input_size[1:]) != (image_size,) * 2
    ):
        return {"img_size": image_size}
    return {}


def create_backbone(
    name: str, *, pretrained: bool, weights_file: str = "", arch: dict[str, Any] | None = None
) -> nn.Module:
    """A timm backbone without its classifier, built with ``arch``; weights from the hub or a local file."""
    import timm

    if not timm.is_model(name):
        raise ModelError(f"unknown timm backbone {name!r} (timm.list_models() lists the names)")
    kwargs: dict[str, Any] = {"num_classes": 0, **(arch or {})}
    if weights_file:
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_weights_file(model, name, weights_file)
        return model
    if pretrained and (why := _hub_unavailable(name)):
        raise ModelError(
            f"cannot load pretrained weights for {name} from the model hub: {why}; set model.weights=FILE "
            "(a local or s3:// .safetensors file), or model.pretrained=false to start from random weights"
        )
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # timm raises many types here; the user needs to know which input was wrong
        raise ModelError(
            f"could not load pretrained weights for {name} from the model hub ({type(e).__name__}: "
            f"{str(e)[:200]}); set model.weights=FILE, or model.pretrained=false to start from random weights"
        ) from None


# The documented prefix mapping of a weights file: a StreetVision train_baseline ``model.safetensors`` holds the
# backbone under ``backbone.`` beside its own ``head.``; DDP's ``module.`` is removed by timm itself.
NETWORK_PREFIX, NETWORK_HEAD = "backbone.", "head."


def load_weights_file(model: nn.Module, name: str, weights_file: str) -> None:
    """Load every backbone tensor of ``model`` from a file, or refuse in one line.

    timm reads ``.safetensors`` itself and ``.pth``/``.bin`` with ``torch.load(weights_only=True)``; the
    model's own checkpoint filter (ViTs: position embeddings resampled to the input size) and the
    classifier's removal apply as they do for hub weights. Unlike timm's pretrained path, which loads
    leniently once the classifier differs, every backbone key must be there and nothing else may be.
    """
    import sys

    from timm.models import load_state_dict

    if not Path(weights_file).is_file():
        raise ModelError(f"backbone weights file {weights_file} does not exist")
    try:
        state = load_state_dict(weights_file, weights_only=True)
        if state and all(k.startswith((NETWORK_PREFIX, NETWORK_HEAD)) for k in state):
            state = {k[len(NETWORK_PREFIX) :]: v for k, v in state.items() if k.startswith(NETWORK_PREFIX)}
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, model)
        for classifier in _as_tuple(getattr(model, "pretrained_cfg", {}).get("classifier")):
            state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:  # a file that is not weights at all, or tensors of other shapes
        raise ModelError(
            f"could not load pretrained weights for {name} from file {weights_file} ({type(e).__name__}: "
            f"{str(e)[:200]}); set model.weights=FILE, or model.pretrained=false to start from random weights"
        ) from None
    if missing or unexpected:
        raise ModelError(
            f"weights file {weights_file} does not fit {name}: {len(missing)} of {name}'s keys missing "
            f"(first: {missing[0] if missing else '-'}), {len(unexpected)} unexpected "
            f"(first: {unexpected[0] if unexpected else '-'}); name a file of this backbone's weights"
        )


def _as_tuple(value: Any) -> tuple[str, ...]:
    return () if not value else (value,) if isinstance(value, str) else tuple(value)


def _hub_unavailable(name: str) -> str | None:
    """Why the model hub cannot provide ``name``'s weights now; None when it can or they are cached.

    One connection attempt, so that a node without network fails in seconds instead of after the hub
    client's retries.
    """
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.get_pretrained_cfg(name)
    hub_id = cfg.hf_hub_id if cfg is not None else None
    if not hub_id:
        return None  # weights from elsewhere (a URL in timm's table): timm reports its own error
    for filename in ("model.safetensors", "pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(hub_id, filename), str):
            return None
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and the weights are not in the local cache"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached ({e.strerror or e})"
    return None


def preprocessing(backbone: nn.Module, image_size: int = 0) -> dict[str, Any]:
    """The backbone's own eval preprocessing (timm's data config), optionally at another input size."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=backbone)
    if image_size:
        cfg["input_size"] = (3, image_size, image_size)
    return {
        "input_size": list(cfg["input_size"]),
        "interpolation": cfg["interpolation"],
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "crop_pct": float(cfg["crop_pct"]),
        "crop_mode": cfg.get("crop_mode", "center"),
    }


def create_transform(prep: dict[str, Any], *, training: bool = False):
    """timm's transform for ``prep`` (the dict saved in model.json): eval, or training augmentation."""
    from timm.data import create_transform as timm_transform

    return timm_transform(
        input_size=tuple(prep["input_size"]),
        interpolation=prep["interpolation"],
        mean=tuple(prep["mean"]),
        std=tuple(prep["std"]),
        crop_pct=prep["crop_pct"],
        crop_mode=prep["crop_mode"],
        is_training=training,
    )


def decode_side(prep: dict[str, Any]) -> int:
    """The short side an image must keep after reduced-size JPEG decoding, for the resize that follows."""
    return int(max(prep["input_size"][1:]) / prep["crop_pct"]) + 1


class RoadworkNet(nn.Module):
    """backbone -> pooled features -> dropout -> one roadwork logit."""

    def __init__(self, backbone: nn.Module, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.num_features, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def build_network(
    backbone: str,
    *,
    pretrained: bool = False,
    weights_file: str = "",
    dropout: float = 0.0,
    arch: dict[str, Any] | None = None,
) -> RoadworkNet:
    backbone_net = create_backbone(backbone, pretrained=pretrained, weights_file=weights_file, arch=arch)
    return RoadworkNet(backbone_net, dropout)


def load_network(
    backbone: str,
    *,
    dropout: float,
    arch: dict[str, Any],
    weights: str | Path,
    described_by: str = "model.json",
) -> RoadworkNet:
    """A trained network rebuilt from what ``model.json`` (or a bundle) records, its weights loaded from
    safetensors (every tensor, nothing missing or extra), in eval mode; weights that do not fit the
    described network are refused in one line naming the first missing and unexpected keys."""
    from safetensors.torch import load_file

    net = build_network(backbone, pretrained=False, dropout=dropout, arch=arch)
    state = load_file(str(weights))
    ours = net.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [k for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    if missing or unexpected or shapes:
        raise ModelError(
            f"{weights} does not fit the {backbone} network {described_by} describes: {len(missing)} key(s) "
            f"missing (first: {missing[0] if missing else '-'}), {len(unexpected)} unexpected (first: "
            f"{unexpected[0] if unexpected else '-'}), {len(shapes)} of another shape (first: "
            f"{shapes[0] if shapes else '-'})"
        )
    net.load_state_dict(state, strict=True)
    return net.eval()
