from kfp import dsl

from components.images import BASE_IMAGE, ENTRYPOINT


@dsl.container_component
def dataset_fingerprint(dataset_uri: str, fingerprint: dsl.OutputPath(str)):
    """The dataset's current fingerprint, so that Kubeflow's cache notices a dataset rewritten in place.

    Never cached. On the object store it lists the prefix (labels.csv's SHA-256, each listed image's size
    and ETag) and downloads nothing but labels.csv; make_splits records it in its config, so its cache key,
    and every later step's inputs, change when the dataset does.

    Args:
        dataset_uri: The dataset folder or s3:// prefix (labels.csv + images).

    Returns:
        fingerprint: SHA-256 hex of the dataset's index and listing.
    """
    return dsl.ContainerSpec(
        image=BASE_IMAGE,
        command=[*ENTRYPOINT, "fingerprint"],
        args=["--dataset", dataset_uri, "--output-file", fingerprint],
    )
