"""The Lightning ``Trainer`` train_baseline runs: hardware, precision, logging, early stopping, checkpoints."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from streetvision.errors import StreetVisionError
from streetvision.models.checkpoint import EpochCheckpoint, LoaderPosition, SafetensorsCheckpointIO
from streetvision.models.lightning import MONITOR, EpochLog


def devices(spec: str):
    """``trainer.devices`` as Lightning takes it: "auto", a count, or a list of indices."""
    spec = spec.strip()
    if spec.isdigit():
        return int(spec)
    if spec.startswith("["):
        return [int(v) for v in spec.strip("[]").split(",") if v.strip()]
    return spec


def launched_by_torchrun() -> tuple[int, int] | None:
    """(nodes, processes per node) when torchrun started this process, as it does in every pod of a
    Kubeflow Trainer TrainJob (from the ``PET_*`` variables it reads as its flags' defaults), else None."""
    if not torch.distributed.is_torchelastic_launched():
        return None
    return int(os.environ["GROUP_WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])


def build_trainer(
    t,
    callbacks: list,
    log_dir: Path,
    identity: str,
    *,
    monitor: str | None = MONITOR,
    mode: str = "max",
    clip_grad: float | None = None,
    workers: int = 0,
):
    """A Trainer for ``t`` (a step's trainer config: max_epochs, patience, accelerator, devices, strategy,
    precision, checkpoint_uri): bf16 autocast on GPU, deterministic on CPU; early stopping on ``monitor``
    (none when None); gradients clipped to norm ``clip_grad``; per-epoch metrics to a CSVLogger (and
    TensorBoard when installed) under ``log_dir``; a progress bar on a terminal, one line per epoch
    elsewhere. ``workers``: the loaders' worker processes; on the CPU the trainer's own threads leave them
    their cores (on 2 cores with one worker, the challenge views of the next batch are made while this
    one trains)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    on_gpu = torch.cuda.is_available() and t.accelerator in ("auto", "gpu", "cuda")
    nodes, per_node, strategy = getattr(t, "num_nodes", 0) or 1, devices(t.devices), t.strategy
    if (elastic := launched_by_torchrun()) is not None:
        # torchrun's world: nodes and processes per node unless set (a mismatch fails in one line);
        # litdata counts nodes by GPUs per node, which a CPU node has none of.
        nodes = getattr(t, "num_nodes", 0) or elastic[0]
        per_node = elastic[1] if t.devices.strip() == "auto" else per_node
        strategy = "ddp" if strategy == "auto" and elastic[0] * elastic[1] > 1 else strategy
        os.environ.setdefault("NNODES", str(elastic[0]))
        if isinstance(per_node, int) and nodes * per_node != elastic[0] * elastic[1]:
            # Lightning checks this only once fit has started, as a traceback on every rank
            raise StreetVisionError(
                f"trainer.num_nodes={nodes} trainer.devices={t.devices}: {nodes} x {per_node} processes, but "
                f"torchrun started {elastic[0]} node(s) x {elastic[1]} (world size {elastic[0] * elastic[1]})"
            )
    if workers and not on_gpu:
        torch.set_num_threads(max(1, torch.get_num_threads() - workers))
    precision = t.precision if t.precision != "auto" else ("bf16-mixed" if on_gpu else "32-true")
    try:
        return L.Trainer(
            max_epochs=t.max_epochs,
            accelerator=t.accelerator,
            devices=per_node,
            num_nodes=nodes,
            strategy=strategy,
            precision=precision,
            deterministic=not on_gpu,
            gradient_clip_val=clip_grad,
            callbacks=[
                *([EarlyStopping(monitor, mode=mode, patience=t.patience)] if monitor else []),
                *callbacks,
                *(
                    [
                        EpochCheckpoint(t.checkpoint_uri, getattr(t, "checkpoint_every_n_steps", 0)),
                        LoaderPosition(),
                    ]
                    if t.checkpoint_uri
                    else []
                ),
                *([] if sys.stderr.isatty() else [EpochLog()]),
            ],
            plugins=[SafetensorsCheckpointIO(identity)],
            logger=[
                CSVLogger(log_dir, name="", version=""),
                *([TensorBoardLogger(log_dir, name="", version="tensorboard")] if _has_tensorboard() else []),
            ],
            enable_checkpointing=bool(t.checkpoint_uri),  # EpochCheckpoint, never a pickled .ckpt
            enable_progress_bar=sys.stderr.isatty(),
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,  # metrics are logged per epoch only; this keeps short epochs from warning
        )
    except (MisconfigurationException, ValueError) as e:  # hardware that is not there, a strategy not
        # installed, nodes x devices that are not torchrun's world
        raise StreetVisionError(
            f"trainer.accelerator={t.accelerator} trainer.devices={t.devices} trainer.num_nodes="
            f"{getattr(t, 'num_nodes', 0)} trainer.strategy={t.strategy}: {str(e).splitlines()[0]}"
        ) from None


def _has_tensorboard() -> bool:
    return (
        importlib.util.find_spec("tensorboard") is not None
        or importlib.util.find_spec("tensorboardX") is not None
    )
