"""pack_shards and streaming benchmarks: images/s streamed from the local S3 against the same images read
from a local folder, and what packing saves on phone-sized JPEGs (bytes, decode time, pipeline time)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import WORK, report

BATCH, WORKERS = 32, 2


def _phone_jpegs(root: Path, n: int) -> Path:
    """``n`` phone-sized JPEGs (3000-4000 px, textured like a photo) with labels.csv."""
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["image,label"]
    for i in range(n):
        w = int(rng.integers(3000, 4001))
        h = w * 3 // 4
        small = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).filter(ImageFilter.DETAIL)
        image.save(root / "images" / f"{i:04d}.jpg", "JPEG", quality=90)
        rows.append(f"images/{i:04d}.jpg,{i % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _splits(data: Path, out: Path) -> Path:
    from streetvision.config import load_config
    from streetvision.steps import make_splits

    if not (out / "manifest.json").exists():
        make_splits.run(load_config(make_splits.Config), dataset=data, out=out)
    return out


def _pack(data: Path, splits: Path, out: str, *overrides: str, env=None) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "streetvision", "pack-shards", "--dataset", str(data), "--splits",
                    str(splits), "--out", out, *overrides], check=True, env=env, capture_output=True)  # fmt: skip
    return time.perf_counter() - t0


def bench_pack_phone_jpegs() -> None:
    """Bytes and decode time per sample, packed at the default max_side vs the original phone JPEGs, and
    the pipeline's wall time: packing once then 5 epochs of decoding, vs decoding the originals 5 times."""
    from streetvision.data.images import load_rgb
    from streetvision.data.packed import open_pack
    from streetvision.steps.pack_shards import PackConfig

    root = WORK / "phone"
    data = root / "data" if (root / "data" / "labels.csv").exists() else _phone_jpegs(root / "data", 48)
    splits = _splits(data, root / "splits")
    shutil.rmtree(root / "pack", ignore_errors=True)
    t_pack = _pack(data, splits, str(root / "pack"))
    pack = open_pack(root / "pack")
    originals = sorted((data / "images").glob("*.jpg"))
    side = 224  # the training input: both paths decode with draft to at least this, as training does
    packed_bytes = pack.manifest.metrics["bytes_packed"]
    original_bytes = sum(p.stat().st_size for p in originals)

    def decode_originals() -> float:
        t0 = time.perf_counter()
        for p in originals:
            load_rgb(p, side)
        return time.perf_counter() - t0

    chunks = [p for p in (root / "pack").rglob("chunk-*.bin")]
    from litdata import StreamingDataset

    def decode_packed() -> float:
        t0 = time.perf_counter()
        for split in pack.samples:
            for item in StreamingDataset(str((root / "pack" / split).resolve())):
                load_rgb(io.BytesIO(item["image"]), side)
        return time.perf_counter() - t0

    t_orig, t_packed = min(decode_originals(), decode_originals()), min(decode_packed(), decode_packed())
    n = len(originals)
    print(f"pack: {n} phone JPEGs ({original_bytes / n / 1e6:.2f} MB each) -> {packed_bytes / n / 1e3:.0f} kB "
          f"per sample at max_side {PackConfig().max_side} ({len(chunks)} chunks); pack {1000 * t_pack / n:.0f} ms "
          f"per image ({pack.manifest.metrics['decode_ms_per_image']:.0f} ms of it decoding, in "
          f"{os.cpu_count()} processes)", flush=True)  # fmt: skip
    report(
        "pack: bytes per sample, packed vs original",
        packed_bytes / n,
        original_bytes / n,
        "< 1",
        packed_bytes < original_bytes,
        unit="B",
    )
    report("pack: decode time per sample (to 224 px), packed vs original", t_packed / n, t_orig / n, "< 1",
           t_packed < t_orig)  # fmt: skip
    epochs = 5
    report(f"pack: pipeline decode wall time, pack once + {epochs} epochs vs {epochs} epochs of originals",
           t_pack + epochs * t_packed, epochs * t_orig, "< 1", t_pack + epochs * t_packed < epochs * t_orig)  # fmt: skip


def bench_stream_throughput() -> None:
    """Training images/s: the packed train split streamed from the local S3 (litdata, a cache smaller than
    the split, so chunks are fetched every epoch) vs the same packed images as files in a local folder,
    same transform, batch and workers. Steady state: the epoch after the first; the first reported too."""
    sys.path.insert(0, str(Path("tests").resolve()))
    import seaweed
    import torch
    from torch.utils.data import DataLoader

    from streetvision.data import packed
    from streetvision.data.demo import write_demo_dataset
    from streetvision.io import store
    from streetvision.models.data import ImageDataset
    from streetvision.models.network import create_transform

    torch.set_num_threads(1)
    prep = {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "crop_pct": 1.0, "crop_mode": "center"}  # fmt: skip
    transform = create_transform(prep)
    WORK.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK))
    server = seaweed.start(tmp / "weed")
    try:
        os.environ.update(server.env())
        store.client.cache_clear()
        data = write_demo_dataset(tmp / "data", n=1500, seed=0, size=256)
        splits = _splits(data, tmp / "splits")
        uri = f"s3://{server.bucket}/pack"
        _pack(data, splits, uri, "pack.chunk_bytes=1048576", env=dict(os.environ))
        pack = packed.open_pack(uri)
        ids = pack.ids("train")
        folder = tmp / "folder"
        _local_copy(uri, tmp / "local")
        from litdata import StreamingDataset

        for item in StreamingDataset(
            str((tmp / "local" / "train").resolve())
        ):  # the same decoded bytes as files
            path = folder / f"{item['index']:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(item["image"])
        train_bytes = sum(o["size"] for n, o in pack.manifest.outputs.items() if n.startswith("train/chunk-"))

        def epochs(loader) -> list[float]:
            rates = []
            for _ in range(3):
                t0 = time.perf_counter()
                count = sum(len(batch[2]) for batch in loader)
                rates.append(count / (time.perf_counter() - t0))
            return rates

        files = [f"{k:06d}.jpg" for k in range(len(ids))]
        images = ImageDataset(folder, files, np.zeros(len(ids)), transform, 224)
        folder_rates = epochs(DataLoader(images, batch_size=BATCH, num_workers=WORKERS, shuffle=True,
                                         persistent_workers=True))  # fmt: skip
        stream = packed.streamed(pack, "train", packed.Decode(transform, 224), cache_dir=tmp / "cache",
                                 cache_bytes=train_bytes // 3, shuffle=True, seed=0)  # fmt: skip
        from litdata import StreamingDataLoader

        stream_rates = epochs(StreamingDataLoader(stream, batch_size=BATCH, num_workers=WORKERS))
        steady_stream, steady_folder = float(np.mean(stream_rates[1:])), float(np.mean(folder_rates[1:]))
        print(f"stream: {len(ids)} train images at 224 px, batch {BATCH}, {WORKERS} workers; cache "
              f"{train_bytes // 3} of {train_bytes} bytes; images/s per epoch streamed {np.round(stream_rates, 1)}, "
              f"folder {np.round(folder_rates, 1)}", flush=True)  # fmt: skip
        report("stream: training images/s at steady state, streamed from S3 vs local folder (time per image)",
               1 / steady_stream, 1 / steady_folder, "throughput >= 0.9 (ratio <= 1.11)",
               steady_stream >= 0.9 * steady_folder)  # fmt: skip
        report("stream: the first (cold) epoch, streamed vs local folder (time per image)", 1 / stream_rates[0],
               1 / folder_rates[0], "reported", True)  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _local_copy(uri: str, local: Path) -> Path:
    from streetvision.io import store

    store.download_dir(uri, local, "pack_shards")
    return local


BENCHMARKS = [bench_pack_phone_jpegs, bench_stream_throughput]
