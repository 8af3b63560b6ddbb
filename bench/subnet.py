"""Subnet benchmarks: serving latency against the validator's 9 s budget, what challenge training and
calibration do to the held-out MCC and simulated reward on validator-style views, and how much train_gate's
learned gate answers beside the plain margin at the same guaranteed risk."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import WORK, report
from bench.train import _demo, _train_keys

BUDGET_S = 9.0  # the validator's timeout per challenge (natix/validator/forward.py)
DEMO = Path(__file__).resolve().parent.parent / "streetvision" / "configs" / "demo.yaml"


def _chain(name: str, shards: Path, splits: Path, train: list[str], views: str) -> dict:
    """train_baseline (reused when already trained with ``train``), sweep_thresholds on ``views``, export_bundle; bundle.json."""
    from streetvision.bundle import verify_bundle
    from streetvision.config import load_config
    from streetvision.io.manifests import MANIFEST
    from streetvision.steps import export_bundle, sweep_thresholds, train_baseline

    root = WORK / "subnet" / name
    p1 = root.parent / f"p1-{hashlib.sha256(' '.join(train).encode()).hexdigest()[:12]}"
    if not (p1 / MANIFEST).exists():
        train_baseline.run(load_config(train_baseline.Config, [], train), shards=shards, out=p1)
    shutil.rmtree(root, ignore_errors=True)
    sweep_thresholds.run(
        load_config(sweep_thresholds.Config, [], [f"sweep.views={views}"]), baseline=p1, out=root / "p2"
    )
    export_bundle.run(
        load_config(export_bundle.Config), baseline=p1, policy=root / "p2", splits=splits, out=root / "b"
    )
    return verify_bundle(root / "b")


def bench_serving_latency() -> None:
    """``Predictor.from_bundle`` and one ``predictor(image)`` call on validator-style JPEGs, for the
    default backbone (DINOv2-small, random weights) built for 224 px, on this machine's CPU."""
    import torch
    from PIL import Image

    from streetvision.data import challenge
    from streetvision.predict import Predictor

    torch.set_num_threads(2)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    data, splits, shards = _demo(96, 224)
    train = ["model.backbone=vit_small_patch14_dinov2.lvd142m", "model.pretrained=false", "data.image_size=224",
             "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.devices=1", "eval.challenge_views=1"]  # fmt: skip
    _chain("latency", shards, splits, train, "challenge")
    bundle = WORK / "subnet" / "latency" / "b"
    loads = []
    for _ in range(3):
        t0 = time.perf_counter()
        predictor = Predictor.from_bundle(bundle)
        loads.append(time.perf_counter() - t0)
    rng = np.random.default_rng(0)
    photos = sorted((data / "images").iterdir())[:30]
    sent = [challenge.encode(challenge.challenge(Image.open(p), rng)[0]) for p in photos]
    predictor(Image.open(io.BytesIO(sent[0])))  # warm-up
    times = []
    for jpeg in sent:
        t0 = time.perf_counter()
        answer = predictor(Image.open(io.BytesIO(jpeg)))
        times.append(time.perf_counter() - t0)
        assert 0 <= answer <= 1
    worst, median = max(times), statistics.median(times)
    report(
        f"serving one validator JPEG, vit_small_patch14_dinov2 at 224 px, CPU (median {median * 1000:.0f} ms, "
        f"worst of {len(times)} {worst * 1000:.0f} ms) vs the validator's 9 s budget",
        worst,
        BUDGET_S,
        "worst <= 10% of the budget (ratio <= 0.1)",
        worst <= 0.1 * BUDGET_S,
    )
    report(
        "Predictor.from_bundle (verify every checksum, build, load weights) vs the 9 s budget",
        min(loads),
        BUDGET_S,
        "once per miner start; <= the budget (ratio <= 1)",
        min(loads) <= BUDGET_S,
    )


def bench_challenge_calibration() -> None:
    """Held-out MCC and simulated reward on challenge views of val_test, on ``make run``'s demo model:
    (clean training, clean calibration), (clean training, challenge calibration), (challenge training,
    challenge calibration). Not a speed target: it prints what the choice does, whatever it is."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    _, splits, shards = _demo(960, 96)
    clean = [*_train_keys(DEMO), "data.augment=none"]
    runs = {
        "clean training, clean calibration": (clean, "clean"),
        "clean training, challenge calibration": (clean, "challenge"),
        "challenge training, challenge calibration": ([*clean, "data.augment=challenge"], "challenge"),
    }
    results = {}
    for i, (label, (train, views)) in enumerate(runs.items()):
        b = _chain(f"calib-{i}", shards, splits, train, views)
        results[label] = b["held_out"]
        ch, cl = b["held_out"]["challenge"], b["held_out"]["clean"]
        levels = " ".join(f"L{k[-1]}={m['mcc']:.3f}" for k, m in ch["by_level"].items())
        print(
            f"{label}: val_test challenge views MCC {ch['metrics']['mcc']:.3f} ({levels}), simulated reward "
            f"{ch['reward']['served']['reward']:.3f} (raw p cut at 0.5: {ch['reward']['raw']['reward']:.3f}); "
            f"clean MCC {cl['metrics']['mcc']:.3f}, reward {cl['reward']['served']['reward']:.3f}",
            flush=True,
        )
    before = results["clean training, clean calibration"]["challenge"]["reward"]["served"]["reward"]
    after = results["challenge training, challenge calibration"]["challenge"]["reward"]["served"]["reward"]
    report(
        "simulated subnet reward on challenge views: challenge training+calibration vs clean (a report)",
        after,
        before,
        "a report, no target",
        True,
        unit="",
    )


def bench_gate_vs_margin() -> None:
    """calibrate_scrc on ``make run``'s demo model trained on challenge views, answering by the margin or by
    train_gate's gate, at the same alpha (CRC, error risk, challenge views): coverage on val_calib's
    calibration part and on held-out val_test, and the error rate among answered val_test views. Not a
    speed target: it prints what the gate buys on this data, whatever it is."""
    from streetvision.bundle import verify_bundle
    from streetvision.config import load_config
    from streetvision.io.manifests import MANIFEST, verify_dir
    from streetvision.steps import calibrate_scrc, export_bundle, train_baseline, train_gate

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    _, splits, shards = _demo(960, 96)
    train = [*_train_keys(DEMO), "data.augment=challenge"]
    root = WORK / "subnet"
    p1 = root / f"p1-{hashlib.sha256(' '.join(train).encode()).hexdigest()[:12]}"  # shared with _chain
    if not (p1 / MANIFEST).exists():
        train_baseline.run(load_config(train_baseline.Config, [], train), shards=shards, out=p1)
    gate = root / "gate"
    shutil.rmtree(gate, ignore_errors=True)
    m = train_gate.run(load_config(train_gate.Config), baseline=p1, shards=shards, out=gate)
    print(
        f"gate on val_select challenge views: AUROC for correctness {m.metrics['val_select_gate_auroc']:.3f} "
        f"(margin {m.metrics['val_select_margin_auroc']:.3f}), AURC {m.metrics['val_select_gate_aurc']:.4f} "
        f"(margin {m.metrics['val_select_margin_aurc']:.4f})",
        flush=True,
    )
    held: dict[tuple[str, float], dict] = {}
    for alpha in (0.03, 0.05):
        for confidence in ("margin", "gate"):
            out = root / f"scrc-{confidence}-{alpha}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = load_config(
                calibrate_scrc.Config, [], [f"scrc.alpha={alpha}", f"scrc.confidence={confidence}"]
            )
            calibrate_scrc.run(cfg, baseline=p1, gate=gate if confidence == "gate" else None, out=out / "c")
            export_bundle.run(load_config(export_bundle.Config, [], ["export.policy=scrc"]), baseline=p1,
                              policy=out / "c", splits=splits, out=out / "b")  # fmt: skip
            b = verify_bundle(out / "b")
            sel = b["held_out"]["challenge"]["selective"]
            held[confidence, alpha] = sel
            calibrated = verify_dir(out / "c", "calibrate_scrc").metrics["coverage"]
            print(
                f"alpha={alpha} {confidence:>6}: coverage val_calib {calibrated:.3f}, val_test {sel['coverage']:.3f}; "
                f"val_test error among answered {sel['selective_risk']:.4f}, realised risk "
                f"{sel['realised_risk']:.4f} (alpha {alpha})",
                flush=True,
            )
    report(
        "calibrate_scrc val_test coverage at alpha=0.05 answering by the gate vs by the margin (a report)",
        held["gate", 0.05]["coverage"],
        held["margin", 0.05]["coverage"],
        "a report, no target",
        True,
        unit="",
    )


BENCHMARKS = [bench_serving_latency, bench_challenge_calibration, bench_gate_vs_margin]
