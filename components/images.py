"""The container images every component references, in one place.

Override at compile time with ``STREETVISION_REGISTRY`` and ``STREETVISION_TAG`` (``make compile
REGISTRY=... TAG=...``), or pin digests with ``STREETVISION_BASE_IMAGE`` / ``STREETVISION_TRAIN_IMAGE``.
"""

import os

from kfp import dsl

REGISTRY = os.environ.get("STREETVISION_REGISTRY", "ghcr.io/streetvision")
TAG = os.environ.get("STREETVISION_TAG", "0.1.0")

# Phases without a neural network: numpy, scikit-learn, boto3, Pillow, safetensors; no torch.
BASE_IMAGE = os.environ.get("STREETVISION_BASE_IMAGE", f"{REGISTRY}/streetvision-base:{TAG}")
# Training and prediction: the base plus torch, Lightning and timm.
TRAIN_IMAGE = os.environ.get("STREETVISION_TRAIN_IMAGE", f"{REGISTRY}/streetvision-train:{TAG}")

# True when the images are the ones the committed YAML references.
DEFAULT = (BASE_IMAGE, TRAIN_IMAGE) == (
    "ghcr.io/streetvision/streetvision-base:0.1.0",
    "ghcr.io/streetvision/streetvision-train:0.1.0",
)

ENTRYPOINT = ["python", "-m", "streetvision"]
# Every step gets the executor input (to write the UI's outputs) and the run and task that ran it, which
# its manifest records so that a manifest leads back to its run in the Kubeflow UI.
KFP_RUN = [
    "--executor-input",
    dsl.PIPELINE_TASK_EXECUTOR_INPUT_PLACEHOLDER,
    "--run-id",
    dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    "--task",
    dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
]
