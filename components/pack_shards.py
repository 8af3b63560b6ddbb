from kfp import dsl

from components.defaults import PACK
from components.images import ENTRYPOINT, KFP_RUN, TRAIN_IMAGE


@dsl.container_component
def pack_shards(
    dataset: dsl.Input[dsl.Dataset],
    splits: dsl.Input[dsl.Artifact],
    shards: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    max_side: int = PACK.pack.max_side,
):
    """pack_shards: read the dataset once, decode each image once, write each split as litdata chunks.

    Args:
        dataset: The dataset: labels.csv and its images, Hugging Face parquet shards, or a folder per class.
        splits: The make_splits output made from this dataset.
        max_side: Images whose shorter side is longer are scaled down to it (0: the original bytes).

    Returns:
        shards: Step directory: per split, litdata chunks and index.json (with each chunk's SHA-256), and
            samples.json (ids and labels in packed order).
        metrics: Images, bytes packed per image, decode time per image, images per second.
    """
    return dsl.ContainerSpec(
        image=TRAIN_IMAGE,
        command=[*ENTRYPOINT, "pack-shards"],
        args=[
            "--dataset",
            dataset.path,
            "--splits",
            splits.path,
            "--out",
            shards.path,
            *KFP_RUN,
            dsl.ConcatPlaceholder(["pack.max_side=", max_side]),
        ],
    )
