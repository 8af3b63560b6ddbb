from kfp import dsl

from components.defaults import SPLIT_RATIOS, SPLITS
from components.images import BASE_IMAGE, ENTRYPOINT, KFP_RUN


@dsl.container_component
def make_splits(
    dataset_uri: str,
    splits: dsl.Output[dsl.Artifact],
    seed: int = SPLITS.seed,
    ratios: str = SPLIT_RATIOS,
    dataset_fingerprint: str = "",
):
    """make_splits: stratified, seeded split of a dataset into train / val_select / val_calib / val_test.

    Args:
        dataset_uri: The dataset's s3:// prefix (labels.csv, parquet shards or a folder per class), read in
            place: only its index (ids and labels), never an image.
        seed: Seed of the per-class shuffle.
        ratios: Shares of train, val_select, val_calib, val_test, as a list summing to 1.
        dataset_fingerprint: The dataset_fingerprint step's output, recorded in the config so that the cache
            key changes with the dataset's content.

    Returns:
        splits: Step directory with splits.json (disjoint id lists, seed, ratios) and manifest.json.
    """
    return dsl.ContainerSpec(
        image=BASE_IMAGE,
        command=[*ENTRYPOINT, "make-splits"],
        args=[
            "--dataset",
            dataset_uri,
            "--out",
            splits.path,
            *KFP_RUN,
            dsl.ConcatPlaceholder(["splits.seed=", seed]),
            dsl.ConcatPlaceholder(["splits.ratios=", ratios]),
            dsl.ConcatPlaceholder(["dataset_fingerprint=", dataset_fingerprint]),
        ],
    )
