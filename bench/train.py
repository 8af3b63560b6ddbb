"""make_splits and train_baseline benchmarks: Lightning step throughput, reduced-size JPEG decoding, cached frozen features."""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np

from bench.common import WORK, best_of, report


def _demo(n: int, size: int) -> tuple[Path, Path, Path]:
    """(the demo dataset, its splits, its pack)."""
    from streetvision.config import load_config
    from streetvision.data.demo import write_demo_dataset
    from streetvision.steps import make_splits, pack_shards

    root = WORK / f"demo-{n}-{size}"
    if not (root / "pack" / "manifest.json").exists():
        write_demo_dataset(root / "data", n=n, seed=0, size=size)
        make_splits.run(load_config(make_splits.Config), dataset=root / "data", out=root / "splits")
        pack_shards.run(load_config(pack_shards.Config), dataset=root / "data", splits=root / "splits",
                        out=root / "pack")  # fmt: skip
    return root / "data", root / "splits", root / "pack"


def bench_training_throughput() -> None:
    """Steady-state training steps per second: epoch 0 warms up, epochs 1-2 are timed, in both loops."""
    import logging

    import lightning as L
    import torch

    from streetvision.data.dataset import load_index
    from streetvision.models import data as mdata
    from streetvision.models.lightning import RoadworkModule
    from streetvision.models.network import build_network, create_transform, decode_side, preprocessing

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    data, _, shards = _demo(320, 128)
    ds, train_ids = load_index(data), json.loads((shards / "samples.json").read_text())["train"]["ids"]
    labels = ds.label_of()
    epochs, bs = 3, 32

    def dataset(net):
        prep = preprocessing(net.backbone, 128)
        y = np.array([labels[i] for i in train_ids])
        return mdata.ImageDataset(Path(ds.uri), train_ids, y, create_transform(prep), decode_side(prep))

    class Timer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.t0 if trainer.current_epoch >= 1 else 0.0

    def lightning_fit() -> float:
        torch.manual_seed(0)
        net = build_network("test_resnet")
        module = RoadworkModule(
            net, lr=1e-3, weight_decay=0.05, warmup_epochs=1, freeze_backbone=False, features_input=False
        )
        timer = Timer()
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[timer],
        )
        trainer.fit(module, train_dataloaders=mdata.loader(dataset(net), bs, shuffle=True))
        return timer.seconds

    def plain_loop() -> float:
        torch.manual_seed(0)
        net = build_network("test_resnet")
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        data_loader = mdata.loader(dataset(net), bs, shuffle=True)
        net.train()
        for epoch in range(epochs):
            if epoch == 1:
                t0 = time.perf_counter()
            for x, y, _ in data_loader:
                opt.zero_grad()
                loss = loss_fn(net(x).squeeze(1), y)
                loss.backward()
                opt.step()
        return time.perf_counter() - t0

    t_plain, t_light = [], []
    for _ in range(3):  # interleaved, so both see the same machine
        t_plain.append(plain_loop())
        t_light.append(lightning_fit())
    throughput = min(t_plain) / min(t_light)
    print(
        f"train_baseline (Lightning) training-step throughput vs hand-written PyTorch loop: ratio {throughput:.3f} "
        f"(Lightning {min(t_light):.2f}s, plain {min(t_plain):.2f}s for {epochs - 1} timed epochs of "
        f"{len(train_ids)} images, batch {bs}, test_resnet 128px; target >= 0.9) "
        f"{'OK' if throughput >= 0.9 else 'MISSED'}",
        flush=True,
    )


def bench_draft_decode() -> None:
    from PIL import Image, ImageOps

    from streetvision.data.demo import _scene
    from streetvision.data.images import load_rgb
    from streetvision.models.network import create_transform, decode_side

    folder = WORK / "phone-jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(4):
        p = folder / f"{i}.jpg"
        if not p.exists():
            scene = _scene(np.random.default_rng(i), 504, bool(i % 2)).resize((4032, 3024), Image.BILINEAR)
            noisy = np.asarray(scene, dtype=np.int16) + np.random.default_rng(i).integers(
                -8, 9, (3024, 4032, 3)
            )
            buf = io.BytesIO()
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=92)
            p.write_bytes(buf.getvalue())
        paths.append(p)
    prep = {
        "input_size": [3, 224, 224],
        "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    transform, side = create_transform(prep), decode_side(prep)

    def draft():
        for p in paths:
            transform(load_rgb(p, side))

    def full():
        for p in paths:
            with Image.open(p) as im:
                transform(ImageOps.exif_transpose(im).convert("RGB"))

    t_full, t_draft = best_of(full, 3), best_of(draft, 3)
    speedup = t_full / t_draft
    print(
        f"decode+preprocess 4032x3024 JPEG to 224px, draft vs full decode: {speedup:.1f}x faster "
        f"(ratio {t_draft / t_full:.3f}; draft {t_draft / len(paths) * 1e3:.0f} ms/image, "
        f"full {t_full / len(paths) * 1e3:.0f} ms/image; target >= 3x) {'OK' if speedup >= 3 else 'MISSED'}",
        flush=True,
    )


def bench_feature_cache() -> None:
    import logging

    from streetvision.config import load_config
    from streetvision.steps import train_baseline

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    _, _, shards = _demo(320, 128)
    common = [
        "model.backbone=test_resnet",
        "model.pretrained=false",
        "model.freeze_backbone=true",
        "data.image_size=128",
        "trainer.max_epochs=10",
        "trainer.patience=100",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
    ]

    def fit(cache: bool):
        out = WORK / f"cache-{cache}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = load_config(
            train_baseline.Config, [], [*common, f"trainer.cache_features={str(cache).lower()}"]
        )
        t0 = time.perf_counter()
        train_baseline.run(cfg, shards=shards, out=out)
        return time.perf_counter() - t0

    t_recompute, t_cached = fit(False), fit(True)
    speedup = t_recompute / t_cached
    report(
        f"frozen backbone, 10 epochs, cached features vs recomputed ({speedup:.1f}x less wall time)",
        t_cached,
        t_recompute,
        ">= 5x less (ratio <= 0.2)",
        speedup >= 5,
    )


def bench_feature_extraction() -> None:
    """The feature cache's extraction (``models.data.infer``, the path the step takes on any device) on a
    DINOv2-small-sized ViT at 224 px vs a plain ``torch.no_grad()`` loop over the same DataLoader."""
    import torch

    from streetvision.data.dataset import load_index
    from streetvision.models import data as mdata
    from streetvision.models.network import (
        architecture,
        create_backbone,
        create_transform,
        decode_side,
        preprocessing,
    )

    torch.set_num_threads(2)
    data, _, _ = _demo(192, 224)
    ds = load_index(data)
    name = "vit_small_patch14_dinov2.lvd142m"
    backbone = create_backbone(name, pretrained=False, arch=architecture(name, 224)).eval()
    prep = preprocessing(backbone, 224)
    images = mdata.ImageDataset(Path(ds.uri), ds.ids, ds.labels, create_transform(prep), decode_side(prep))
    cpu = torch.device("cpu")

    def ours():
        mdata.infer(backbone, images, batch_size=32, device=cpu, precision="32-true")

    def plain():
        with torch.no_grad():
            for x, _, _ in mdata.loader(images, 32):
                backbone(x)

    ours()  # warm-up (first-touch allocations, oneDNN kernel selection)
    t_plain, t_ours = best_of(plain, 2), best_of(ours, 2)
    report(
        f"feature extraction, {name} (random weights) at 224 px, {len(images)} images, CPU: "
        f"{len(images) / t_ours:.1f} vs {len(images) / t_plain:.1f} images/s; throughput ratio {t_plain / t_ours:.3f}",
        t_ours,
        t_plain,
        "throughput >= 0.9 of the plain loop (time ratio <= 1.11)",
        t_plain / t_ours >= 0.9,
    )


def bench_checkpoint_overhead() -> None:
    """What writing a checkpoint after every epoch costs: the demo model (``make run``'s settings), five
    epochs with and without ``trainer.checkpoint_uri``."""
    import logging

    from streetvision.config import load_config
    from streetvision.steps import train_baseline

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    _, _, shards = _demo(1200, 96)
    demo = Path(__file__).resolve().parent.parent / "streetvision" / "configs" / "demo.yaml"
    common = ["trainer.max_epochs=5", "trainer.patience=100"]

    def fit(checkpoints: bool) -> float:
        out, ckpt = WORK / f"ckpt-{checkpoints}", WORK / "ckpt-store"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
        extra = [f"trainer.checkpoint_uri={ckpt}"] if checkpoints else []
        cfg = load_config(train_baseline.Config, [], [*_train_keys(demo), *common, *extra])
        t0 = time.perf_counter()
        train_baseline.run(cfg, shards=shards, out=out)
        return time.perf_counter() - t0

    t_plain = min(fit(False), fit(False))
    t_ckpt = min(fit(True), fit(True))
    report(
        "training the demo model 5 epochs, a checkpoint after every epoch vs none",
        t_ckpt,
        t_plain,
        "<= 5% more (ratio <= 1.05)",
        t_ckpt / t_plain <= 1.05,
    )


def _train_keys(profile: Path) -> list[str]:
    """The train_baseline keys of a run profile as overrides."""
    import yaml

    doc = yaml.safe_load(profile.read_text())
    return [f"{section}.{k}={v}" for section in ("model", "data", "trainer") for k, v in doc[section].items()]


BENCHMARKS = [
    bench_training_throughput,
    bench_draft_decode,
    bench_feature_cache,
    bench_feature_extraction,
    bench_checkpoint_overhead,
]
