"""pack_shards, ``pack_shards``: the dataset read once, each image decoded once, written as litdata chunks per split.

Reads the dataset in storage order (parquet row group by row group; files and objects by a bounded window
of concurrent reads), never whole on local disk: each finished chunk is hashed, sent to an ``s3://`` output
at once and removed locally. Images are decoded in a pool of processes, their shorter side bounded to
``pack.max_side`` and stored as JPEG (``max_side`` 0 keeps the original bytes). Every unreadable image is
counted and named in one line, and nothing is committed. The manifest records the dataset's content
identity (ids, labels and the original bytes), which every reader checks against the splits' lineage.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from streetvision.config import require
from streetvision.data import packed
from streetvision.data.dataset import (
    DataError,
    SourceConfig,
    content_sha256,
    dataset_input,
    image_bytes,
)
from streetvision.io.manifests import Manifest
from streetvision.io.outputs import StepOutputs
from streetvision.progress import Progress
from streetvision.steps import commit, start
from streetvision.steps.make_splits import split_dataset

STEP = packed.STEP
MiB = 1024 * 1024


@dataclass
class PackConfig:
    # Images whose shorter side is longer are scaled down to it: 512 keeps the validator's smallest crop
    # (a side of sqrt(0.2) of the image, at 224 px: challenge.DECODE_SIDE = 501) at full resolution.
    max_side: int = 512
    quality: int = packed.JPEG_QUALITY
    chunk_bytes: int = 64 * MiB  # litdata chunk size
    workers: int = 0  # decoding processes; 0: one per core


@dataclass
class Config:
    source: SourceConfig = field(default_factory=SourceConfig)
    pack: PackConfig = field(default_factory=PackConfig)

    def check(self) -> None:
        self.source.check()
        p = self.pack
        require(p.max_side == 0 or 64 <= p.max_side <= 8192, "pack.max_side", p.max_side, "0 or 64..8192")
        require(50 <= p.quality <= 100, "pack.quality", p.quality, "50..100")
        require(64 * 1024 <= p.chunk_bytes <= 2**31, "pack.chunk_bytes", p.chunk_bytes, "64 KiB..2 GiB")
        require(0 <= p.workers <= 256, "pack.workers", p.workers, "0..256")


def _writers(parts: dict[str, list[str]], scratch: Path, chunk_bytes: int):
    from litdata.streaming.writer import BinaryWriter

    return {split: BinaryWriter(str(scratch / split), chunk_bytes=chunk_bytes) for split in parts}


def run(
    config: Config,
    *,
    dataset: Path,
    splits: Path,
    out: Path,
    sources: dict[str, str] | None = None,
    run_id: str | None = None,
    task: str = "",
) -> Manifest:
    inputs = start(STEP, config, {"dataset": dataset, "splits": splits}, sources)
    ds, _, parts = split_dataset(dataset, splits, inputs.src, config.source)
    split_of = {i: name for name, ids in parts.items() for i in ids}
    position = {i: p for p, i in enumerate(ds.ids)}
    wanted = [position[i] for i in split_of]
    p = config.pack
    scratch_dir = tempfile.TemporaryDirectory(prefix="sv-pack-")  # the chunk being written, per split
    scratch = Path(scratch_dir.name)
    writers = _writers(parts, scratch, p.chunk_bytes)
    samples = {name: {"ids": [], "labels": []} for name in parts}
    hashes, bad, stored, decode_s = {}, [], 0, 0.0
    progress = Progress("pack_shards", len(wanted))
    started = time.perf_counter()
    procs = p.workers or os.cpu_count() or 1
    with scratch_dir, StepOutputs(out, STEP) as outputs, _decoders(procs, len(wanted)) as decode:
        for batch in _batches(_read(ds, wanted, progress), 32 * procs):  # a bounded window in memory
            done = decode([(data or b"", p.max_side, p.quality) for _, data in batch])
            for (pos, _), (sha, data, seconds) in zip(batch, done, strict=True):
                ident, split = ds.ids[pos], split_of[ds.ids[pos]]
                hashes[ident], decode_s = sha, decode_s + seconds
                if data is None:
                    bad.append(ident)
                    continue
                k, label = len(samples[split]["ids"]), int(ds.labels[pos])
                samples[split]["ids"].append(ident)
                samples[split]["labels"].append(label)
                stored += len(data)
                if chunk := writers[split].add_item(k, {"image": data, "label": label, "index": k}):
                    outputs.move(f"{split}/{Path(chunk).name}", chunk)
        progress.close()
        if bad:
            raise DataError(f"dataset {inputs.src['dataset']}: {len(bad)} unreadable or truncated image(s) "
                            f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); nothing packed")  # fmt: skip
        for split, writer in writers.items():
            _finish(outputs, split, writer, scratch / split)
        outputs.write_json(packed.SAMPLES, samples)
        identity = content_sha256(ds, hashes)
        elapsed = time.perf_counter() - started
        metrics = {"images": len(wanted), "bytes_packed": stored, "bytes_per_image": round(stored / len(wanted)),
                   "decode_ms_per_image": round(1000 * decode_s / len(wanted), 3), "seconds": round(elapsed, 3),
                   "images_per_s": round(len(wanted) / elapsed, 2), "bytes_read": progress.bytes}  # fmt: skip
        records = inputs.records() | {
            "dataset": dataset_input(ds, inputs.src["dataset"], content_sha256=identity)
        }
        return commit(outputs, config, records, metrics, run_id=run_id, task=task)


POOL_FROM = 1000  # images per decoding process below which one process decodes (no start-up to pay)


@contextmanager
def _decoders(procs: int, images: int):
    """``decode(jobs) -> results`` of :func:`packed.prepare`, in order: a pool of ``procs`` processes (spawned:
    no fork of a process holding threads), or this process for a small dataset."""
    if procs < 2 or images < POOL_FROM * procs:
        yield lambda jobs: [packed.prepare(job) for job in jobs]
        return
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        yield lambda jobs: pool.map(packed.prepare, jobs, 4)


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _read(ds, wanted: list[int], progress: Progress):
    for pos, data in image_bytes(ds, wanted):
        progress.update(1, len(data or b""))
        yield pos, data


def _finish(outputs: StepOutputs, split: str, writer, folder: Path) -> None:
    """The split's last chunks in, and litdata's index with every chunk's SHA-256 added."""
    for chunk in writer.done():
        outputs.move(f"{split}/{Path(chunk).name}", chunk)
    worker_index = folder / f"0.{packed.LITDATA_INDEX}"
    index = json.loads(worker_index.read_text())
    for chunk in index["chunks"]:
        chunk["sha256"] = outputs.files[f"{split}/{chunk['filename']}"].sha256
    outputs.write_json(f"{split}/{packed.LITDATA_INDEX}", index)
    worker_index.unlink()
