"""Resumable training without pickle: Lightning's checkpoints as one safetensors file, written atomically.

Lightning's checkpoint (weights, optimizer and scheduler states, loop progress, callback states) is split
into its tensors, stored as safetensors, and everything else, stored as JSON in the file's metadata. As a
``CheckpointIO`` plugin it lets Lightning's own resume (``fit(ckpt_path=...)``) restore training exactly,
and :class:`EpochCheckpoint` writes one after every epoch to ``trainer.checkpoint_uri`` (a folder or an
``s3://`` prefix), where a retried pod finds it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from streetvision.errors import StreetVisionError
from streetvision.io import atomic, store

CHECKPOINT = "last.safetensors"
HISTORY = "history.csv"  # the CSVLogger's rows up to the checkpoint, so a resumed history has no gap
_TENSOR, _PAIRS, _META = "__tensor__", "__pairs__", "streetvision_checkpoint"


class CheckpointError(StreetVisionError):
    """A checkpoint cannot be read or does not belong to this training."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {
            _PAIRS: [
                [_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k}]")] for k, v in obj.items()
            ]
        }
    if isinstance(obj, list | tuple):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise CheckpointError(f"checkpoint value {where} ({type(obj).__name__}) cannot be stored without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        if set(obj) == {_PAIRS}:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj[_PAIRS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def save(checkpoint: dict[str, Any], path: str | os.PathLike, identity: str = "") -> atomic.Written:
    from safetensors.torch import save as to_bytes

    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_encode(checkpoint, tensors, "checkpoint"))
    return atomic.write_bytes(path, to_bytes(tensors, metadata={_META: skeleton, "identity": identity}))


def _header(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a StreetVision checkpoint ({type(e).__name__}: {e})") from None


def load(path: str | os.PathLike) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            skeleton = json.loads((f.metadata() or {})[_META])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a StreetVision checkpoint ({type(e).__name__}: {e})") from None
    return _decode(skeleton, tensors)


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning's checkpoint IO, with safetensors + JSON instead of ``torch.save``'s pickle; every file
    it writes carries ``identity``."""

    def __init__(self, identity: str = ""):
        self.identity = identity

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        save(checkpoint, path, self.identity)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return load(path)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


class RandomState(L.Callback):
    """Carries torch's global RNG (dropout, augmentation in the main process) through a checkpoint.

    The batch order needs nothing: it is a function of the seed and the epoch (``data.EpochShuffle``).
    """

    def __init__(self) -> None:
        self._pending: torch.Tensor | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get("torch_rng_state")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is not None:  # where the uninterrupted run was when the checkpoint was saved
            torch.set_rng_state(self._pending)
            self._pending = None


class LoaderPosition(L.Callback):
    """Loads the train loader's saved position (litdata's state) when a training resumes mid-epoch.

    Lightning loads it only into a loader it builds after restoring the checkpoint; a schedule that reads
    ``trainer.estimated_stepping_batches`` while the optimizers are configured builds the loader before,
    and the position was dropped (a resumed epoch started over, in the next epoch's order).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop._load_combined_loader_states()  # a no-op unless restarting mid-epoch with states


class EpochCheckpoint(Checkpoint):
    """After every epoch, Lightning's full checkpoint to ``uri/last.safetensors``: replaced atomically in
    a folder, uploaded whole (one PUT or multipart completion) to the object store. A ``Checkpoint``, so
    Lightning runs it after every other callback's end-of-epoch work (early stopping included). With
    ``every_n_steps``, also after every n-th optimizer step inside an epoch: the streamed loader's position
    is in it (litdata's state), so a resumed training continues the epoch where it stopped."""

    def __init__(self, uri: str, every_n_steps: int = 0):
        self.uri, self.every_n_steps = uri, every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        last = batch_idx + 1 >= trainer.num_training_batches  # the epoch's end has its own, after validation
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and not last:
            self._save(trainer)

    def save_history(self, trainer: L.Trainer) -> None:
        trainer.logger.save()
        rows = Path(trainer.logger.log_dir) / "metrics.csv"
        if rows.is_file():
            store.write_bytes(store.join(self.uri, HISTORY), rows.read_bytes())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: L.Trainer) -> None:
        with tempfile.TemporaryDirectory(prefix="sv-ckpt-") as tmp:
            local = Path(tmp) / CHECKPOINT if store.is_s3(self.uri) else Path(self.uri) / CHECKPOINT
            if trainer.is_global_zero:  # history first: a resume keeps the rows its checkpoint covers
                self.save_history(trainer)
            trainer.save_checkpoint(local)  # every rank calls it; rank 0 writes
            if trainer.is_global_zero and store.is_s3(self.uri):
                store.upload_file(local, store.join(self.uri, CHECKPOINT))
            trainer.strategy.barrier("checkpoint")


def resume_from(uri: str, identity: str, local_dir: Path) -> tuple[Path, str] | None:
    """(a local copy of the checkpoint at ``uri``, the history up to it) when it belongs to ``identity``
    (same config and inputs), else None: a checkpoint of another training is never resumed."""
    if not uri or not store.exists(store.join(uri, CHECKPOINT)):
        return None
    path = Path(uri) / CHECKPOINT
    if store.is_s3(uri):
        path = store.download_file(store.join(uri, CHECKPOINT), local_dir / CHECKPOINT).path
    header = _header(path)
    if header.get("identity") != identity:
        print(
            f"the checkpoint at {uri} belongs to another training (other config or inputs); starting afresh"
        )
        return None
    meta = json.loads(header[_META])
    epoch = meta["epoch"]
    print(
        f"resuming from the checkpoint at {uri} (epoch {epoch}, optimizer step {meta['global_step']})",
        flush=True,
    )
    history = store.join(uri, HISTORY)
    text = store.read_bytes(history).decode() if store.exists(history) else ""
    # The history is saved just before its checkpoint: keep the rows of the epochs the checkpoint holds.
    return path, _csv([r for r in csv.DictReader(io.StringIO(text)) if int(r["epoch"]) <= epoch])


def joined_history(previous: str, current: Path) -> str:
    """The CSVLogger rows before a resume and after it, as one CSV (columns in order of appearance)."""
    rows = list(csv.DictReader(io.StringIO(previous)))
    if current.is_file():
        rows += list(csv.DictReader(current.open(newline="")))
    return _csv(rows)


def _csv(rows: list[dict[str, str]]) -> str:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
