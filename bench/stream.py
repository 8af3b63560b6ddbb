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
ROUNDS = 4  # epochs of each loader in bench_stream_throughput; the first is the cold one


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
        store.reset_clients()
        data = write_demo_dataset(tmp / "data", n=4500, seed=0, size=256)
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

        files = [f"{k:06d}.jpg" for k in range(len(ids))]
        images = ImageDataset(folder, files, np.zeros(len(ids)), transform, 224)
        stream = packed.streamed(pack, "train", packed.Decode(transform, 224), cache_dir=tmp / "cache",
                                 cache_bytes=train_bytes // 3, shuffle=True, seed=0)  # fmt: skip
        from litdata import StreamingDataLoader

        loaders = {
            "folder": DataLoader(
                images, batch_size=BATCH, num_workers=WORKERS, shuffle=True, persistent_workers=True
            ),
            "fresh": DataLoader(images, batch_size=BATCH, num_workers=WORKERS, shuffle=True),
            "stream": StreamingDataLoader(stream, batch_size=BATCH, num_workers=WORKERS),
        }
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(ROUNDS):  # one epoch of each a round, interleaved: this machine's drift hits all alike
            for name, loader in loaders.items():
                t0 = time.perf_counter()
                count = sum(len(batch[2]) for batch in loader)
                rates[name].append(count / (time.perf_counter() - t0))
        stream_rates, folder_rates, fresh_rates = rates["stream"], rates["folder"], rates["fresh"]
        steady_stream, steady_folder = float(np.mean(stream_rates[1:])), float(np.mean(folder_rates[1:]))
        print(f"stream: {len(ids)} train images at 224 px, batch {BATCH}, {WORKERS} workers; cache "
              f"{train_bytes // 3} of {train_bytes} bytes; images/s per epoch streamed {np.round(stream_rates, 1)}, "
              f"folder {np.round(folder_rates, 1)}, folder with fresh workers every epoch (as litdata's) "
              f"{np.round(fresh_rates, 1)}", flush=True)  # fmt: skip
        report("stream: training images/s at steady state, streamed from S3 vs local folder (time per image)",
               1 / steady_stream, 1 / steady_folder, "throughput >= 0.9 (ratio <= 1.11)",
               steady_stream >= 0.9 * steady_folder)  # fmt: skip
        report("stream: a local folder's loader with fresh workers every epoch vs persistent ones (time per image)",
               1 / float(np.mean(fresh_rates[1:])), 1 / steady_folder, "reported", True)  # fmt: skip
        report("stream: the first (cold) epoch, streamed vs local folder (time per image)", 1 / stream_rates[0],
               1 / folder_rates[0], "reported", True)  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _folder_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass  # removed meanwhile (a cache eviction, a finished download)
    return total


def bench_stream_at_scale() -> None:
    """A dataset 20x the stream cache, as a real one is to a pod's disk: 20,000 generated 64 px JPEGs packed
    to the local S3, then train_baseline (1 epoch, test_vit, every split streamed) with data.cache_bytes a
    twentieth of the pack, its whole temporary folder sampled every 20 ms. Reports the peak against the
    cache plus the chunks in flight, and checks one streamed epoch of the train split for every sample once."""
    import threading

    sys.path.insert(0, str(Path("tests").resolve()))
    import seaweed
    from PIL import Image

    from streetvision.data import packed
    from streetvision.models.datamodule import EpochLoader

    n, chunk_bytes = 20_000, 256 * 1024
    WORK.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK))
    server = seaweed.start(tmp / "weed")
    try:
        os.environ.update(server.env())
        from streetvision.io import store

        store.reset_clients()
        data, rng = tmp / "data", np.random.default_rng(0)
        (data / "images").mkdir(parents=True)
        rows = ["image,label"]
        for i in range(n):  # a class-dependent tint in noise: small, distinct JPEGs
            label = i % 2
            pixels = rng.integers(0, 200, (64, 64, 3), dtype=np.uint8)
            pixels[..., label] += 55
            Image.fromarray(pixels).save(data / "images" / f"{i:05d}.jpg", quality=85)
            rows.append(f"images/{i:05d}.jpg,{label}")
        (data / "labels.csv").write_text("\n".join(rows) + "\n")
        dataset_bytes = sum(p.stat().st_size for p in (data / "images").iterdir())
        splits = _splits(data, tmp / "splits")
        uri = f"s3://{server.bucket}/pack"
        t_pack = _pack(data, splits, uri, f"pack.chunk_bytes={chunk_bytes}", env=dict(os.environ))
        pack = packed.open_pack(uri)
        chunk_sizes = [o["size"] for name, o in pack.manifest.outputs.items() if "/chunk-" in name]
        pack_bytes, chunk = sum(chunk_sizes), max(chunk_sizes)
        cache = pack_bytes // 20
        print(f"scale: {n} images ({dataset_bytes / 1e6:.1f} MB as JPEGs) packed to S3 in {t_pack:.1f} s: "
              f"{pack_bytes / 1e6:.1f} MB in {len(chunk_sizes)} chunks of at most {chunk / 1e3:.0f} kB; "
              f"data.cache_bytes {cache / 1e6:.2f} MB ({pack_bytes / cache:.0f}x smaller)", flush=True)  # fmt: skip

        steps = tmp / "step-tmp"
        steps.mkdir()
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _folder_bytes(steps))
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "streetvision", "train-baseline", "--shards", uri,
                            "--out", f"s3://{server.bucket}/train_baseline", "model.backbone=test_vit",
                            "model.pretrained=false", "model.freeze_backbone=false", "data.image_size=32",
                            "data.batch_size=64", "data.augment=none", "eval.challenge_views=0",
                            "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.devices=1",
                            f"data.cache_bytes={cache}"], capture_output=True, text=True,
                           env={**os.environ, "TMPDIR": str(steps)})  # fmt: skip
        elapsed = time.perf_counter() - t0
        done.set()
        sampler.join()
        if r.returncode != 0:
            raise SystemExit(f"scale: train_baseline failed: {r.stderr[-2000:]}")
        committed = store.committed_manifest(f"s3://{server.bucket}/train_baseline", "train_baseline")
        scored = committed.metrics
        print(f"scale: train_baseline streamed {n} images in {elapsed:.1f} s (1 epoch, every split scored); "
              f"peak of its temporary folder {peak[0] / 1e6:.2f} MB; val_select MCC {scored['val_select_mcc']:.3f}",
              flush=True)  # fmt: skip
        bound = cache + 4 * chunk  # the cache, and a chunk in flight per split being read and being evicted
        report("scale: peak disk of the training step vs data.cache_bytes + 4 chunks (one of the pack 20x the cache)",
               peak[0], bound, "<= 1", peak[0] <= bound, unit="B")  # fmt: skip

        stream = packed.streamed(pack, "train", packed.Decode(lambda im: 0, 16), cache_dir=tmp / "epoch",
                                 cache_bytes=cache // 2, shuffle=True, seed=0)  # fmt: skip
        seen = [int(i) for _, _, batch in EpochLoader(stream, {"epochs": 0}, batch_size=64) for i in batch]
        total = len(pack.ids("train"))
        report("scale: one streamed epoch of the train split, distinct samples seen vs samples", len(set(seen)),
               total, "== 1 (each once)", len(seen) == len(set(seen)) == total, unit="")  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def bench_packed_vs_originals_mcc() -> None:
    """Validator-view MCC on val_test of the same trainings (make run's demo profile, seeds 0-2) from a pack
    at the default max_side (512) and from one keeping the original bytes, on 1024 px demo images: the mean
    paired difference (same seed) with its standard error, from the seeds' spread (training noise) and a
    bootstrap over val_test's images, their views resampled together (test-set noise)."""
    from streetvision.eval.metrics import compute_mcc
    from streetvision.eval.sweep import probabilities

    root = WORK / "maxside"
    data = root / "data"
    if not (data / "labels.csv").exists():
        from streetvision.data.demo import write_demo_dataset

        write_demo_dataset(data, n=960, seed=0, size=1024)
    splits = _splits(data, root / "splits")
    train = ["model.backbone=test_efficientnet", "model.pretrained=false", "model.freeze_backbone=false",
             "model.lr=0.003", "data.image_size=96", "data.num_workers=1", "trainer.max_epochs=10",
             "trainer.patience=4", "trainer.accelerator=cpu", "trainer.devices=1"]  # fmt: skip
    seeds = (0, 1, 2)
    settings = (("max_side 512 (default)", "512"), ("original bytes", "0"))
    views, predicted = {}, {}  # seed -> (image of each view, label); (max_side, seed) -> predictions at 0.5
    for label, max_side in settings:
        pack = root / f"pack-{max_side}"
        shutil.rmtree(pack, ignore_errors=True)
        _pack(data, splits, str(pack), f"pack.max_side={max_side}")
        for seed in seeds:
            out = root / f"train-{max_side}-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "streetvision", "train-baseline", "--shards", str(pack),
                            "--out", str(out), *train, f"seed={seed}"], check=True, capture_output=True)  # fmt: skip
            rows = np.load(out / "views_val_test_challenge.npy")[:, 0]
            views[seed] = rows, np.load(out / "labels_val_test.npy").astype(int)[rows]
            predicted[max_side, seed] = probabilities(np.load(out / "logits_val_test_challenge.npy")) >= 0.5
            mcc = compute_mcc(views[seed][1], predicted[max_side, seed])
            print(f"maxside: {label}, seed {seed}: packed {json_metric(pack, 'bytes_per_image') / 1e3:.0f} kB "
                  f"an image; val_test challenge-view MCC {mcc:.3f}", flush=True)  # fmt: skip
    images = np.unique(views[seeds[0]][0])
    by_image = {s: {i: np.flatnonzero(views[s][0] == i) for i in images} for s in seeds}

    def differences(drawn: np.ndarray) -> np.ndarray:
        out = []
        for s in seeds:
            take = np.concatenate([by_image[s][i] for i in drawn])
            y = views[s][1][take]
            out.append(compute_mcc(y, predicted["512", s][take]) - compute_mcc(y, predicted["0", s][take]))
        return np.array(out)

    diffs = differences(images)
    rng = np.random.default_rng(0)
    boot = [differences(rng.choice(images, len(images))).mean() for _ in range(300)]
    se_seeds, se_test = float(np.std(diffs, ddof=1) / np.sqrt(len(seeds))), float(np.std(boot))
    se = float(np.hypot(se_seeds, se_test))
    print(f"maxside: MCC difference (512 - original) per seed {np.round(diffs, 3)}, mean {diffs.mean():+.3f}, "
          f"standard error {se:.3f} (seeds {se_seeds:.3f}, test images {se_test:.3f}) over {len(images)} "
          f"val_test images x {len(views[seeds[0]][0]) // len(images)} views", flush=True)  # fmt: skip
    report("maxside: |mean MCC difference| vs 2 standard errors (within noise)", abs(float(diffs.mean())), 2 * se,
           "<= 1", abs(float(diffs.mean())) <= 2 * se, unit="")  # fmt: skip


def json_metric(step: Path, key: str) -> float:
    import json

    return json.loads((step / "manifest.json").read_text())["metrics"][key]


def _local_copy(uri: str, local: Path) -> Path:
    from streetvision.io import store

    store.download_dir(uri, local, "pack_shards")
    return local


BENCHMARKS = [
    bench_pack_phone_jpegs,
    bench_stream_throughput,
    bench_stream_at_scale,
    bench_packed_vs_originals_mcc,
]
