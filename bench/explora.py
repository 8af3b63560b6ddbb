"""adapt_explora's benchmark: what ExPLoRA does to a linear probe across a domain gap, on this machine's data.

A small ViT (``test_vit``, DINOv2's block layout) is first pre-trained self-supervised on a *shifted*
demo domain (other colours, larger objects, a striped texture: ``demo-data --domain shifted``), every
block trained, from random weights: the stand-in for a hub backbone pre-trained elsewhere. Then, same
seed, same data: a linear probe (train_baseline with a frozen backbone, cached features, the head alone) of those
weights on the street demo data, ExPLoRA (adapt_explora) of those weights on the street data's train split, and
the same linear probe of the adapted backbone. Not a speed target: it prints val_select MCC before and
after, whatever they are. The paper's anchor (DINOv2 ViT-L on fMoW, 69.0 -> 77.5 linear-probe top-1) is a
different scale of model and data.
"""

from __future__ import annotations

import logging
import shutil

from bench.common import WORK, report

SIDE = 64
SSL = [
    "model.backbone=test_vit", "model.pretrained=false", f"data.image_size={SIDE}", "data.batch_size=32",
    "data.local_crops=4", "explora.prototypes=1024", "explora.head_hidden=256", "explora.bottleneck=64",
    "trainer.accelerator=cpu", "trainer.devices=1", "seed=0",
]  # fmt: skip
PROBE = [
    "model.backbone=test_vit", f"data.image_size={SIDE}", "model.freeze_backbone=true", "model.lr=0.01",
    "data.batch_size=32", "trainer.max_epochs=30", "trainer.patience=30", "trainer.accelerator=cpu",
    "trainer.devices=1", "eval.challenge_views=0", "seed=0",
]  # fmt: skip


def _data(name: str, n: int, domain: str):
    from streetvision.config import load_config
    from streetvision.data.demo import write_demo_dataset
    from streetvision.steps import make_splits, pack_shards

    root = WORK / "explora" / name
    if not (root / "pack" / "manifest.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        write_demo_dataset(root / "data", n=n, seed=1 if domain == "shifted" else 0, size=SIDE, domain=domain)
        make_splits.run(load_config(make_splits.Config), dataset=root / "data", out=root / "splits")
        pack_shards.run(load_config(pack_shards.Config), dataset=root / "data", splits=root / "splits",
                        out=root / "pack")  # fmt: skip
    return root / "pack"


def bench_explora_linear_probe() -> None:
    from streetvision.config import load_config
    from streetvision.steps import adapt_explora, train_baseline

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    shifted = _data("shifted", 1200, "shifted")
    street = _data("street", 1200, "street")
    root = WORK / "explora"
    for d in ("pretrained", "adapted", "probe-random", "probe-before", "probe-after"):
        shutil.rmtree(root / d, ignore_errors=True)

    def ssl(shards, out, *overrides):
        cfg = load_config(adapt_explora.Config, [], [*SSL, *overrides])
        return adapt_explora.run(cfg, shards=shards, out=out)

    def probe(out, weights):
        keys = [f"model.weights={weights}"] if weights else ["model.pretrained=false"]
        cfg = load_config(train_baseline.Config, [], [*PROBE, *keys])
        return train_baseline.run(cfg, shards=street, out=out)

    # Every block trained, from random weights.
    pre = ssl(shifted, root / "pretrained", "explora.unfrozen_blocks=6", "trainer.max_epochs=20")
    random = probe(root / "probe-random", "")
    before = probe(root / "probe-before", root / "pretrained" / "backbone.safetensors")
    adapted = ssl(street, root / "adapted", "model.pretrained=true",
                  f"model.weights={root / 'pretrained' / 'backbone.safetensors'}", "trainer.max_epochs=10")  # fmt: skip
    after = probe(root / "probe-after", root / "adapted")
    print(
        f"pre-training on the shifted domain: {pre.metrics['trainable_parameters']:,} trainable parameters, DINO "
        f"loss {pre.metrics['first_epoch_loss']:.3f} -> {pre.metrics['last_epoch_loss']:.3f}; ExPLoRA on the street "
        f"train split: {adapted.metrics['trainable_parameters']:,} trainable ({adapted.metrics['lora_parameters']:,} "
        f"LoRA), loss {adapted.metrics['first_epoch_loss']:.3f} -> {adapted.metrics['last_epoch_loss']:.3f}, merge "
        f"max |diff| {adapted.metrics['merge_max_abs_diff']:.2e}",
        flush=True,
    )
    print(
        f"linear probe on street val_select: MCC {random.metrics['val_select_mcc']:.3f} of random weights, "
        f"{before.metrics['val_select_mcc']:.3f} before ExPLoRA, "
        f"{after.metrics['val_select_mcc']:.3f} after (accuracy {before.metrics['val_select_accuracy']:.3f} -> "
        f"{after.metrics['val_select_accuracy']:.3f})",
        flush=True,
    )
    report(
        "linear-probe val_select MCC after ExPLoRA vs before, test_vit pre-trained on a shifted domain (a report)",
        after.metrics["val_select_mcc"],
        before.metrics["val_select_mcc"],
        "a report, no target",
        True,
        unit="",
    )


BENCHMARKS = [bench_explora_linear_probe]
