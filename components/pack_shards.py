from kfp import dsl

from components.defaults import PACK
from components.images import ENTRYPOINT, KFP_RUN, TRAIN_IMAGE


@dsl.container_component
def pack_shards(
    dataset_uri: str,
    splits: dsl.Input[dsl.Artifact],
    shards: dsl.Output[dsl.Artifact],
    shards_uri: dsl.OutputPath(str),
    metrics: dsl.Output[dsl.Metrics],
    max_side: int = PACK.pack.max_side,
):
    """pack_shards: read the dataset once, decode each image once, write each split as litdata chunks.

    Args:
        dataset_uri: The dataset's s3:// prefix: labels.csv and its images, Hugging Face parquet shards, or a
            folder per class; read once, in place (a bounded window of images at a time).
        splits: The make_splits output made from this dataset.
        max_side: Images whose shorter side is longer are scaled down to it (0: the original bytes).

    Returns:
        shards: Step directory, committed straight to the artifact's URI on the object store (each chunk
            uploaded as it is finished; the pod never holds the pack): per split, litdata chunks and
            index.json (with each chunk's SHA-256), and samples.json (ids and labels in packed order).
        shards_uri: The artifact's URI, which the training steps stream from (an artifact input would be
            copied into their pods whole).
        metrics: Images, bytes packed per image, decode time per image, images per second.
    """
    return dsl.ContainerSpec(
        image=TRAIN_IMAGE,
        command=[*ENTRYPOINT, "pack-shards"],
        args=[
            "--dataset",
            dataset_uri,
            "--splits",
            splits.path,
            "--out",
            shards.uri,
            *KFP_RUN,
            dsl.ConcatPlaceholder(["pack.max_side=", max_side]),
        ],
    )
