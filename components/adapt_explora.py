from kfp import dsl

from components.defaults import EXPLORA
from components.images import ENTRYPOINT, KFP_RUN, TRAIN_IMAGE


@dsl.container_component
def adapt_explora(
    shards_uri: str,
    explora: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    backbone: str = EXPLORA.model.backbone,
    pretrained: bool = EXPLORA.model.pretrained,
    weights_uri: str = EXPLORA.model.weights,
    image_size: int = EXPLORA.data.image_size,
    batch_size: int = EXPLORA.data.batch_size,
    epochs: int = EXPLORA.trainer.max_epochs,
    rank: int = EXPLORA.explora.rank,
    unfrozen_blocks: int = EXPLORA.explora.unfrozen_blocks,
    extra_images: str = EXPLORA.explora.extra_images,
    seed: int = EXPLORA.seed,
    checkpoint_root: str = "",
):
    """adapt_explora: ExPLoRA, self-supervised adaptation of a ViT backbone to the train split's images.

    DINO self-distillation (EMA teacher, centring, multi-crop) with the last blocks unfrozen and LoRA on
    Q and V elsewhere; the adapters are merged afterwards. Labels and the other splits are never read.

    Args:
        shards_uri: URI of the pack_shards output (only its train split's images are read, streamed).
        backbone: timm ViT name (DINOv2 by default).
        pretrained: Start from the hub's pretrained weights.
        weights_uri: Backbone weights file (local path or s3:// URI) used instead of the hub.
        image_size: Global crops' side in pixels; 0 keeps the backbone's own.
        batch_size: Images per batch.
        epochs: Epochs of self-distillation.
        rank: LoRA rank on Q and V (0: the preset for the backbone's width).
        unfrozen_blocks: The last blocks trained fully.
        extra_images: An s3:// prefix of unlabelled street images added to the train split's (empty: none).
        seed: Seed for initialisation, crops and shuffling.
        checkpoint_root: Folder or s3:// prefix for per-epoch checkpoints (empty: none); the step writes
            under <checkpoint_root>/<run id>/adapt-explora, so a retried task resumes where it stopped.

    Returns:
        adapted: Step directory: backbone.safetensors (merged, timm-loadable), model.json (parameter counts,
            merge check), history.csv, config.yaml, manifest.json.
        metrics: Trainable parameters, first and last epoch loss, the merge's largest difference.
    """
    return dsl.ContainerSpec(
        image=TRAIN_IMAGE,
        command=[*ENTRYPOINT, "adapt-explora"],
        args=[
            "--shards",
            shards_uri,
            "--out",
            explora.path,
            *KFP_RUN,
            "--checkpoint-root",
            checkpoint_root,
            dsl.ConcatPlaceholder(["model.backbone=", backbone]),
            dsl.ConcatPlaceholder(["model.pretrained=", pretrained]),
            dsl.ConcatPlaceholder(["model.weights=", weights_uri]),
            dsl.ConcatPlaceholder(["data.image_size=", image_size]),
            dsl.ConcatPlaceholder(["data.batch_size=", batch_size]),
            dsl.ConcatPlaceholder(["trainer.max_epochs=", epochs]),
            dsl.ConcatPlaceholder(["explora.rank=", rank]),
            dsl.ConcatPlaceholder(["explora.unfrozen_blocks=", unfrozen_blocks]),
            dsl.ConcatPlaceholder(["explora.extra_images=", extra_images]),
            dsl.ConcatPlaceholder(["seed=", seed]),
        ],
    )
