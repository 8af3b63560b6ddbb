from typing import Optional

from kfp import dsl

from components.defaults import TRAIN
from components.images import ENTRYPOINT, KFP_RUN, TRAIN_IMAGE


@dsl.container_component
def train_baseline(
    shards_uri: str,
    baseline: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    backbone: str = TRAIN.model.backbone,
    pretrained: bool = TRAIN.model.pretrained,
    weights_uri: str = TRAIN.model.weights,
    freeze_backbone: bool = TRAIN.model.freeze_backbone,
    epochs: int = TRAIN.trainer.max_epochs,
    lr: float = TRAIN.model.lr,
    batch_size: int = TRAIN.data.batch_size,
    image_size: int = TRAIN.data.image_size,
    seed: int = TRAIN.seed,
    augment: str = TRAIN.data.augment,
    challenge_views: int = TRAIN.eval.challenge_views,
    checkpoint_root: str = "",
    explora: Optional[dsl.Input[dsl.Model]] = None,  # noqa: UP045 - the KFP SDK reads Optional
):
    """train_baseline: train a timm backbone + head with Lightning, selected and early-stopped on val_select MCC.

    Args:
        shards_uri: URI of the pack_shards output (its shards_uri): the packed splits, streamed through a
            bounded local cache, never copied whole.
        backbone: timm model name.
        pretrained: Load the hub's pretrained weights for the backbone.
        weights_uri: Backbone weights file (local path or s3:// URI) used instead of the hub.
        freeze_backbone: Train the head only (features are then computed once and cached).
        epochs: Maximum epochs; early stopping may end sooner.
        lr: AdamW learning rate (warmup, then cosine decay).
        batch_size: Images per batch.
        image_size: Input side in pixels; 0 keeps the backbone's own.
        seed: Seed for initialisation and shuffling.
        augment: Training augmentation: none, timm, or challenge (the subnet validator's views).
        challenge_views: Validator-style views per val_calib and val_test image, scored for sweep_thresholds and
            the bundle's report (0: none).
        checkpoint_root: Folder or s3:// prefix for per-epoch checkpoints (empty: none); the step writes
            under <checkpoint_root>/<run id>/train-baseline, so a retried task resumes where it stopped.
        explora: adapt_explora output: the adapted backbone train_baseline starts from (instead of the hub's).

    Returns:
        model: Step directory: model.safetensors, model.json, logits/labels/ids for val_select, val_calib
            and val_test (and their challenge views), history.csv, metrics.json, config.yaml, manifest.json.
        metrics: val_select and val_calib metrics for the Kubeflow UI.
    """
    return dsl.ContainerSpec(
        image=TRAIN_IMAGE,
        command=[*ENTRYPOINT, "train-baseline"],
        args=[
            "--shards",
            shards_uri,
            dsl.IfPresentPlaceholder(input_name="explora", then=["--explora", explora.path]),
            "--out",
            baseline.path,
            *KFP_RUN,
            "--checkpoint-root",
            checkpoint_root,
            dsl.ConcatPlaceholder(["model.backbone=", backbone]),
            dsl.ConcatPlaceholder(["model.pretrained=", pretrained]),
            dsl.ConcatPlaceholder(["model.weights=", weights_uri]),
            dsl.ConcatPlaceholder(["model.freeze_backbone=", freeze_backbone]),
            dsl.ConcatPlaceholder(["trainer.max_epochs=", epochs]),
            dsl.ConcatPlaceholder(["model.lr=", lr]),
            dsl.ConcatPlaceholder(["data.batch_size=", batch_size]),
            dsl.ConcatPlaceholder(["data.image_size=", image_size]),
            dsl.ConcatPlaceholder(["seed=", seed]),
            dsl.ConcatPlaceholder(["data.augment=", augment]),
            dsl.ConcatPlaceholder(["eval.challenge_views=", challenge_views]),
        ],
    )
