"""Phase 3, ``train_gate``: a learned gate that scores whether phase 1's decision on an image is right.

The phase-1 network is loaded from its verified output and never changed. Its backbone computes each
image's pooled features once (the feature-cache path of phase 1: ``models.data.infer`` on the device),
its head the logit; the gate (``models.gate``) learns P(decision correct) from them. The decision is
phase 1's at the max-MCC threshold on val_select. Only ``train`` fits the gate and only ``val_select``
stops and selects it; val_calib and val_test are only scored, with the ids and challenge views phase 1
wrote, so phase 5 can calibrate on the gate's val_calib scores and the bundle report its val_test ones.
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
from streetvision.config import read_json, require, to_dict, to_yaml
from streetvision.data.dataset import DataError, dataset_input
from streetvision.eval import sweep
from streetvision.eval.metrics import auroc
from streetvision.eval.views import VIEWS, gate_file
from streetvision.io.manifests import Manifest, input_record, sha256_json
from streetvision.io.outputs import StepOutputs
from streetvision.steps import start
from streetvision.steps.make_splits import split_dataset
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
        check_trainer(t)
        require(t.patience >= 0, "trainer.patience", t.patience, "0 or more")
        require(0 <= self.seed < 2**32, "seed", self.seed, "an integer in [0, 2^32)")


def ui_outputs(out: Path) -> dict[str, Any]:
    return {"report": "report.md"}


def _phase1_config(manifest: Manifest, where: str) -> tuple[int, int]:
    """(seed, challenge views per image) phase 1 ran with, from its manifest."""
    try:
        return int(manifest.config["seed"]), int(manifest.config["eval"]["challenge_views"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"--phase1 {where}: its manifest records no seed and eval.challenge_views") from None


def run(
    config: Config,
    *,
    phase1: Path,
    dataset: Path,
    splits: Path,
    out: Path,
    sources: dict[str, str] | None = None,
    run_id: str | None = None,
    task: str = "",
) -> Manifest:
    import lightning as L

    from streetvision.models.data import loader
    from streetvision.models.datamodule import RoadworkData
    from streetvision.models.gate import MONITOR, GateModule, GateNet, gate_scores
    from streetvision.models.lightning import BestWeights
    from streetvision.models.network import load_network
    from streetvision.models.rescore import Rescorer
    from streetvision.models.trainer import build_trainer

    src = {"phase1": str(phase1), "splits": str(splits), "dataset": str(dataset), **(sources or {})}
    p1 = start(STEP, config, {"phase1": phase1, "dataset": dataset, "splits": splits}, src)["phase1"]
    ds, _, parts = split_dataset(dataset, splits, src)
    info, (p1_seed, p1_views) = read_json(phase1 / "model.json", DataError), _phase1_config(p1, src["phase1"])
    _check_rows(phase1, parts, src["phase1"])

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", module=r"lightning\.")
    L.seed_everything(config.seed, workers=True, verbose=False)
    with ExitStack() as stack:
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sv-gate-logs-")))
        best = BestWeights(MONITOR, mode="min")
        identity = sha256_json({"config": to_dict(config), "phase1": p1.self_sha256})
        trainer = build_trainer(config.trainer, [best], log_dir, identity, monitor=MONITOR, mode="min")
        device, precision = trainer.strategy.root_device, str(trainer.precision)
        net = load_network(
            info["backbone"],
            dropout=info["dropout"],
            arch=info["architecture"],
            weights=phase1 / "model.safetensors",
        ).to(device)
        data = RoadworkData(ds.root, parts, ds.label_of(), info["preprocessing"], int(info["decode_min_side"]),
                            batch_size=config.data.batch_size, num_workers=config.data.num_workers,
                            augment="none", cache=False, seed=p1_seed)  # fmt: skip

        rescore = Rescorer(net, data, phase1, device=device, precision=precision,
                           phase1_precision=p1.extra.get("precision", "32-true"), batch_size=config.data.batch_size,
                           num_workers=config.data.num_workers, where=src["phase1"])  # fmt: skip
        g = config.gate
        fit = {
            split: rescore.rows(
                _views(data, split, g.train_views, config.seed)
                if g.views == "challenge"
                else data.images(split)
            )
            for split in FIT_SPLITS
        }
        scored = {split: rescore.split(split) for split in EVAL_SPLITS}  # checked against phase 1's logits
        has_views = (phase1 / "logits_val_calib_challenge.npy").is_file()
        challenged = {
            split: rescore.views(split, p1_views) for split in (CHALLENGE_SPLITS if has_views else ())
        }

        # The decision the gate judges: phase 1's at the max-MCC threshold on val_select's rows.
        sel = fit["val_select"]
        threshold, _ = sweep.choose_threshold(sweep.exact_sweep(sweep.sigmoid(sel.logits), sel.labels))
        gate = GateNet(sel.features.shape[1], g.hidden, g.dropout, threshold)
        tensors = {split: _gate_rows(r, threshold) for split, r in fit.items()}
        gate.standardise_on(*tensors["train"].tensors[:2])
        module = GateModule(gate, lr=g.lr, weight_decay=g.weight_decay)
        trainer.fit(
            module,
            train_dataloaders=loader(tensors["train"], g.batch_size, shuffle=True, seed=config.seed),
            val_dataloaders=loader(tensors["val_select"], g.batch_size),
        )
        gate.load_state_dict(best.state)
        gate.eval()
        history = (log_dir / "metrics.csv").read_text()

    scores = {split: gate_scores(gate, r.features, r.logits) for split, r in scored.items()}
    scores |= {
        f"{split}_challenge": gate_scores(gate, r.features, r.logits) for split, r in challenged.items()
    }
    report = _selective_report(sel, gate_scores(gate, sel.features, sel.logits), threshold)
    metrics = {"best_epoch": best.best_epoch, "epochs_run": trainer.current_epoch, "threshold": threshold,
               **{f"val_select_{k}": v for k, v in report.items()}}  # fmt: skip
    with StepOutputs(out, STEP) as outputs:
        for split in EVAL_SPLITS:
            outputs.write_npy(gate_file(split, "clean"), scores[split])
        for split in challenged:
            outputs.write_npy(gate_file(split, "challenge"), scores[f"{split}_challenge"])
        outputs.write_safetensors(
            "gate.safetensors", {k: v.contiguous() for k, v in gate.state_dict().items()}
        )
        outputs.write_json("model.json", {
            "num_features": int(sel.features.shape[1]), "hidden": g.hidden, "dropout": g.dropout,
            "threshold": threshold, "weights": "gate.safetensors", "views": g.views,
            "inputs": "[backbone features, logit, |2 * served - 1| at threshold], standardised",
            "output": "logit of P(phase 1's decision at threshold is right)",
            "phase1_weights_sha256": p1.outputs["model.safetensors"]["sha256"],
        })  # fmt: skip
        outputs.write_text("history.csv", history)
        outputs.write_json("metrics.json", {"val_select": report, "threshold": threshold})
        outputs.write_text("report.md", _markdown(report, threshold, g.views, len(fit["train"].labels)))
        outputs.write_text("config.yaml", to_yaml(config))
        return outputs.commit(
            config=to_dict(config),
            inputs={
                "phase1": input_record(phase1, src["phase1"]),
                "dataset": dataset_input(ds, src["dataset"]),
                "splits": input_record(splits, src["splits"]),
            },
            metrics=metrics,
            run_id=run_id,
            task=task,
            extra={"precision": precision},
        )


def _check_rows(phase1: Path, parts: dict[str, list[str]], where: str) -> None:
    """Phase 1's scored ids are the splits' own, in their order (the gate's rows align with them)."""
    for split in EVAL_SPLITS:
        if read_json(phase1 / f"ids_{split}.json", DataError, list) != parts[split]:
            raise DataError(f"--phase1 {where}: ids_{split}.json is not the {split} of --splits")


def _views(data, split: str, views: int, seed: int):
    """``views`` seeded challenge views of every image of a split the gate fits on."""
    from streetvision.models.data import ChallengeViews

    return ChallengeViews(data.images(split), views, seed)


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
            "# Learned gate (phase 3)",
            "",
            f"Judges phase 1's decision at threshold {threshold:.6f} (max MCC on val_select); fitted on "
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
