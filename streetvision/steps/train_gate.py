"""train_gate, ``train_gate``: a learned gate that scores whether train_baseline's decision on an image is right.

The train_baseline network is loaded from its verified output and never changed. Its backbone computes each
image's pooled features once (the feature-cache path of train_baseline: ``models.data.infer`` on the device),
its head the logit; the gate (``models.gate``) learns P(decision correct) from them. The decision is
train_baseline's at the max-MCC threshold on val_select. Only ``train`` fits the gate and only ``val_select``
stops and selects it; val_calib and val_test are only scored, with the ids and challenge views train_baseline
wrote, so calibrate_scrc can calibrate on the gate's val_calib scores and the bundle report its val_test ones.
With ``gate.views=challenge`` (the default) the gate learns on validator-style challenge views of train
and val_select, the inputs it will be asked about.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from streetvision.bundle import served_probability
from streetvision.config import read_json, require, to_dict
from streetvision.data.dataset import DataError
from streetvision.eval import sweep
from streetvision.eval.metrics import auroc
from streetvision.eval.views import VIEWS, gate_file
from streetvision.io.manifests import Manifest, sha256_json
from streetvision.io.outputs import StepOutputs
from streetvision.steps import commit, start
from streetvision.steps.train_baseline import (
    CHALLENGE_SPLITS,
    EVAL_SPLITS,
    MAX_BATCH,
    MAX_WORKERS,
    check_trainer,
)

STEP = "train_gate"
FIT_SPLITS = ("train", "val_select")  # the only splits whose labels reach the gate's fit


@dataclass
class GateConfig:
    hidden: int = 64  # hidden units of the MLP
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256  # gate rows per step
    views: str = "challenge"  # what train and val_select are for the gate: challenge views or clean images
    train_views: int = 4  # challenge views per train and val_select image (levels spread evenly)


@dataclass
class DataConfig:
    batch_size: int = 32  # images per backbone batch
    num_workers: int = 0
    cache_bytes: int = 8 * 2**30  # local disk for the split being streamed


@dataclass
class TrainerConfig:
    max_epochs: int = 100
    patience: int = 10  # epochs without a lower val_select AURC before stopping
    accelerator: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU
    # The gate is a small MLP: one device, no checkpoints (a rerun takes seconds).
    devices = "1"
    strategy = "auto"
    checkpoint_uri = ""


@dataclass
class Config:
    gate: GateConfig = field(default_factory=GateConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0

    def check(self) -> None:
        g, d, t = self.gate, self.data, self.trainer
        require(1 <= g.hidden <= 65536, "gate.hidden", g.hidden, "1..65536")
        require(0 <= g.dropout < 1, "gate.dropout", g.dropout, "a probability in [0, 1)")
        require(0 < g.lr < 10, "gate.lr", g.lr, "a learning rate in (0, 10)")
        require(0 <= g.weight_decay < 10, "gate.weight_decay", g.weight_decay, "a number in [0, 10)")
        require(1 <= g.batch_size <= MAX_BATCH, "gate.batch_size", g.batch_size, f"1..{MAX_BATCH}")
        require(g.views in VIEWS, "gate.views", g.views, ", ".join(VIEWS))
        require(1 <= g.train_views <= 64, "gate.train_views", g.train_views, "1..64")
        require(1 <= d.batch_size <= MAX_BATCH, "data.batch_size", d.batch_size, f"1..{MAX_BATCH}")
        require(0 <= d.num_workers <= MAX_WORKERS, "data.num_workers", d.num_workers, f"0..{MAX_WORKERS}")
        require(2**20 <= d.cache_bytes <= 2**50, "data.cache_bytes", d.cache_bytes, "1 MiB..1 PiB")
        check_trainer(t)
        require(t.patience >= 0, "trainer.patience", t.patience, "0 or more")
        require(0 <= self.seed < 2**32, "seed", self.seed, "an integer in [0, 2^32)")


def ui_outputs(out: Path) -> dict[str, Any]:
    return {"report": "report.md"}


def _baseline_config(manifest: Manifest, where: str) -> tuple[int, int]:
    """(seed, challenge views per image) train_baseline ran with, from its manifest."""
    try:
        return int(manifest.config["seed"]), int(manifest.config["eval"]["challenge_views"])
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"--baseline {where}: its manifest records no seed and eval.challenge_views"
        ) from None


def run(
    config: Config,
    *,
    baseline: Path,
    shards: str | Path,
    out: Path,
    sources: dict[str, str] | None = None,
    run_id: str | None = None,
    task: str = "",
) -> Manifest:
    import lightning as L

    from streetvision.data.packed import open_pack
    from streetvision.models.datamodule import RoadworkData
    from streetvision.models.gate import MONITOR, gate_scores
    from streetvision.models.lightning import BestWeights
    from streetvision.models.network import load_network
    from streetvision.models.rescore import Rescorer
    from streetvision.models.trainer import build_trainer

    inputs = start(STEP, config, {"baseline": baseline, "shards": shards}, sources)
    src, p1 = inputs.src, inputs.manifests["baseline"]
    pack = open_pack(shards, inputs.manifests["shards"])
    parts = pack.parts()
    info = read_json(baseline / "model.json", DataError)
    p1_seed, p1_views = _baseline_config(p1, src["baseline"])
    _check_rows(baseline, parts, src["baseline"])

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", module=r"lightning\.")
    L.seed_everything(config.seed, workers=True, verbose=False)
    with ExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sv-gate-logs-")))
        best = BestWeights(MONITOR, mode="min")
        identity = sha256_json({"config": to_dict(config), "baseline": p1.self_sha256})
        trainer = build_trainer(
            config.trainer,
            [best],
            log_dir,
            identity,
            monitor=MONITOR,
            mode="min",
            workers=config.data.num_workers,
        )
        device, precision = trainer.strategy.root_device, str(trainer.precision)
        net = load_network(info["backbone"], dropout=info["dropout"], arch=info["architecture"],
                           weights=baseline / "model.safetensors").to(device)  # fmt: skip
        data = RoadworkData(pack, info["preprocessing"], int(info["decode_min_side"]),
                            batch_size=config.data.batch_size, num_workers=config.data.num_workers,
                            augment="none", cache=False, seed=p1_seed, cache_dir=Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sv-stream-"))),
                            cache_bytes=config.data.cache_bytes)  # fmt: skip
        rescore = Rescorer(net, data, baseline, device=device, precision=precision,
                           baseline_precision=p1.extra.get("precision", "32-true"), batch_size=config.data.batch_size,
                           num_workers=config.data.num_workers, where=src["baseline"])  # fmt: skip
        fit, scored = _rows(rescore, data, config, p1_views if (baseline / CHALLENGED).is_file() else 0)
        gate, threshold = _fit_gate(trainer, best, fit, config)
        sel, g = fit["val_select"], config.gate
        history = (log_dir / "metrics.csv").read_text()

    report = _selective_report(sel, gate_scores(gate, sel.features, sel.logits), threshold)
    metrics = {"best_epoch": best.best_epoch, "epochs_run": trainer.current_epoch, "threshold": threshold,
               **{f"val_select_{k}": v for k, v in report.items()}}  # fmt: skip
    with StepOutputs(out, STEP) as outputs:
        for name, r in scored.items():  # val_test, or val_test_challenge: the view is the name's suffix
            split = name.removesuffix("_challenge")
            view = "clean" if name == split else "challenge"
            outputs.write_npy(gate_file(split, view), gate_scores(gate, r.features, r.logits))
        outputs.write_safetensors(
            "gate.safetensors", {k: v.contiguous() for k, v in gate.state_dict().items()}
        )
        outputs.write_json("model.json", {
            "num_features": int(sel.features.shape[1]), "hidden": g.hidden, "dropout": g.dropout,
            "threshold": threshold, "weights": "gate.safetensors", "views": g.views,
            "inputs": "[backbone features, logit, |2 * served - 1| at threshold], standardised",
            "output": "logit of P(train_baseline's decision at threshold is right)",
            "baseline_weights_sha256": p1.outputs["model.safetensors"]["sha256"],
        })  # fmt: skip
        outputs.write_text("history.csv", history)
        outputs.write_json("metrics.json", {"val_select": report, "threshold": threshold})
        outputs.write_text("report.md", _markdown(report, threshold, g.views, len(fit["train"].labels)))
        return commit(outputs, config, inputs.records() | pack.lineage(), metrics, run_id=run_id, task=task,
                      extra={"precision": precision})  # fmt: skip


CHALLENGED = "logits_val_calib_challenge.npy"  # train_baseline scored challenge views


def _rows(rescore, data, config: Config, views_per_image: int):
    """(the rows the gate fits on: train and val_select, clean or in challenge views; the rows it scores:
    each evaluated split, and its challenge views when train_baseline scored ``views_per_image`` > 0),
    each row's features and logit computed by train_baseline's network and checked against its scores."""
    g = config.gate
    fit = {
        split: rescore.rows(
            _views(data, split, g.train_views, config.seed) if g.views == "challenge" else data.images(split)
        )
        for split in FIT_SPLITS
    }
    scored = {split: rescore.split(split) for split in EVAL_SPLITS}
    if views_per_image:
        scored |= {f"{split}_challenge": rescore.views(split, views_per_image) for split in CHALLENGE_SPLITS}
    return fit, scored


def _fit_gate(trainer, best, fit: dict, config: Config):
    """(the gate, its threshold): trained on train's rows and selected on val_select's, judging train_baseline's decision at
    the max-MCC threshold on val_select."""
    from streetvision.models.data import loader
    from streetvision.models.gate import GateModule, GateNet

    g, sel = config.gate, fit["val_select"]
    threshold, _ = sweep.choose_threshold(sweep.exact_sweep(sweep.sigmoid(sel.logits), sel.labels))
    gate = GateNet(sel.features.shape[1], g.hidden, g.dropout, threshold)
    tensors = {split: _gate_rows(r, threshold) for split, r in fit.items()}
    gate.standardise_on(*tensors["train"].tensors[:2])
    trainer.fit(
        GateModule(gate, lr=g.lr, weight_decay=g.weight_decay),
        train_dataloaders=loader(tensors["train"], g.batch_size, shuffle=True, seed=config.seed),
        val_dataloaders=loader(tensors["val_select"], g.batch_size),
    )
    gate.load_state_dict(best.state)
    return gate.eval(), threshold


def _check_rows(baseline: Path, parts: dict[str, list[str]], where: str) -> None:
    """train_baseline's scored ids are the splits' own, in their order (the gate's rows align with them)."""
    for split in EVAL_SPLITS:
        if read_json(baseline / f"ids_{split}.json", DataError, list) != parts[split]:
            raise DataError(f"--baseline {where}: ids_{split}.json is not the {split} of --splits")


def _views(data, split: str, views: int, seed: int):
    """``views`` seeded challenge views of every image of a split the gate fits on."""
    return data.challenge_views(split, views, seed)


def _gate_rows(r, threshold: float):
    """(features, logit, decision correct) as tensors for the gate's fit."""
    import torch
    from torch.utils.data import TensorDataset

    correct = sweep.decide(sweep.sigmoid(r.logits), threshold) == r.labels
    return TensorDataset(
        torch.from_numpy(r.features.astype(np.float32)),
        torch.from_numpy(r.logits.astype(np.float32)),
        torch.from_numpy(correct.astype(np.float32)),
    )


def _selective_report(sel, gate: np.ndarray, threshold: float) -> dict[str, float]:
    """How well the gate ranks val_select's rows by correctness, against the margin |2·served − 1|."""
    correct = sweep.decide(sweep.sigmoid(sel.logits), threshold) == sel.labels
    margin = np.abs(2 * served_probability(sweep.sigmoid(sel.logits), threshold) - 1)
    by_gate, by_margin = sweep.risk_coverage(gate, correct), sweep.risk_coverage(margin, correct)
    return {
        "rows": int(len(correct)),
        "accuracy": float(correct.mean()),
        "gate_auroc": auroc(gate, correct.astype(int)),
        "margin_auroc": auroc(margin, correct.astype(int)),
        "gate_aurc": by_gate.aurc,
        "margin_aurc": by_margin.aurc,
        "gate_e_aurc": by_gate.e_aurc,
        "margin_e_aurc": by_margin.e_aurc,
    }


def _markdown(report: dict[str, float], threshold: float, views: str, train_rows: int) -> str:
    return "\n".join(
        [
            "# Learned gate (train_gate)",
            "",
            f"Judges train_baseline's decision at threshold {threshold:.6f} (max MCC on val_select); fitted on "
            f"{train_rows} train rows ({views}), selected on {report['rows']} val_select rows, where the "
            f"decision is right on {report['accuracy']:.1%}.",
            "",
            "| confidence | AUROC for correctness | AURC (lower is better) | E-AURC |",
            "|---|---|---|---|",
            f"| gate | {report['gate_auroc']:.4f} | {report['gate_aurc']:.4f} | {report['gate_e_aurc']:.4f} |",
            f"| margin abs(2·served − 1) | {report['margin_auroc']:.4f} | {report['margin_aurc']:.4f} | "
            f"{report['margin_e_aurc']:.4f} |",
            "",
        ]
    )
