"""The default StreetVision pipeline: make_splits -> train_baseline -> sweep_thresholds -> export_bundle;
with ``policy=scrc`` calibrate_scrc (after train_gate with ``scrc_confidence=gate``) instead of the sweep.

``build_pipeline(options)`` returns the pipeline function; :class:`PlatformOptions` holds what is decided
at compile time (credentials Secret, GPU request, node selector, tolerations, CPU and memory). The committed
``pipelines/streetvision.yaml`` is ``build_pipeline()`` with the defaults (CPU, no selectors).
"""

from dataclasses import dataclass, field

from kfp import dsl, kubernetes

from components.calibrate_scrc import calibrate_scrc
from components.dataset_fingerprint import dataset_fingerprint
from components.defaults import TRAIN
from components.export_bundle import export_bundle
from components.make_splits import make_splits
from components.sweep_thresholds import sweep_thresholds
from components.train_baseline import train_baseline
from components.train_gate import train_gate


@dataclass(frozen=True)
class PlatformOptions:
    # Secret with the object-store credentials, exposed to the steps as the standard AWS variables.
    s3_secret: str = "streetvision-s3"  # noqa: S105 - the Secret's name, not a secret
    s3_secret_keys: dict[str, str] = field(
        default_factory=lambda: {
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            "AWS_ENDPOINT_URL_S3": "AWS_ENDPOINT_URL_S3",
            "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
        }
    )
    gpus: int = 0  # GPUs requested by the training step
    gpu_resource: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=dict)  # for the training step
    tolerations: list[dict[str, str]] = field(default_factory=list)  # {key, operator, value, effect}
    # Requests per pod; memory limits equal the requests (a pod that outgrows them is told so plainly
    # instead of starving its node) and CPU is not limited (a CPU limit only throttles).
    train_cpu: str = "4"
    train_memory: str = "16G"
    step_cpu: str = "1"
    step_memory: str = "2G"


def _with_resources(task, cpu: str, memory: str):
    return task.set_cpu_request(cpu).set_memory_request(memory).set_memory_limit(memory)


def _with_credentials(task, options: PlatformOptions):
    return kubernetes.use_secret_as_env(
        task,
        secret_name=options.s3_secret,
        secret_key_to_env={k: v for k, v in options.s3_secret_keys.items()},
    )


def _on_training_nodes(task, options: PlatformOptions):
    _with_resources(task, options.train_cpu, options.train_memory)
    if options.gpus:
        task.set_accelerator_type(options.gpu_resource).set_accelerator_limit(options.gpus)
    for key, value in options.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in options.tolerations:
        kubernetes.add_toleration(
            task,
            key=t.get("key"),
            operator=t.get("operator", "Equal"),
            value=t.get("value"),
            effect=t.get("effect"),
        )
    return task


def build_pipeline(options: PlatformOptions | None = None):
    options = options or PlatformOptions()

    @dsl.pipeline(
        name="streetvision",
        description="Train, calibrate and export the StreetVision roadwork classifier "
        "(make_splits -> train_baseline -> sweep_thresholds -> export_bundle).",
    )
    def streetvision(
        dataset_uri: str,
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
        calibrate_on: str = "challenge",
        max_fnr: float = 1.0,
        policy: str = "threshold",
        scrc_alpha: float = 0.05,
        scrc_delta: float = 0.0,
        scrc_risk: str = "error",
        scrc_confidence: str = "margin",
        min_test_mcc: float = -1.0,
        checkpoint_root: str = "",
    ):
        """StreetVision default pipeline.

        Args:
            dataset_uri: Object-store URI of the dataset folder (labels.csv + images), e.g. s3://bucket/roadwork.
            backbone: timm model name of the backbone.
            pretrained: Load the hub's pretrained backbone weights.
            weights_uri: Backbone weights file (s3:// URI) used instead of the hub; empty for the hub.
            freeze_backbone: Train the head only.
            epochs: Maximum training epochs (early stopping on val_select MCC may end sooner).
            lr: Learning rate.
            batch_size: Training batch size.
            image_size: Input side in pixels (0: the backbone's own).
            seed: Seed for the splits and the training.
            augment: Training augmentation: none, timm, or challenge (the subnet validator's views).
            challenge_views: Validator-style views per val_calib and val_test image (0: none).
            calibrate_on: What the threshold is fitted on: challenge (validator-style views) or clean.
            max_fnr: Policy constraint: largest false-negative rate on val_calib (1.0: none).
            policy: The policy to ship: threshold (phase 2, one threshold for every image) or scrc (phase 5:
                answer or defer, with the risk of the answers controlled at scrc_alpha).
            scrc_alpha: scrc: the risk level of the answered images.
            scrc_delta: scrc: 0.0 controls the risk in expectation; otherwise with probability 1 - delta.
            scrc_risk: scrc: error (wrong answers) or fnr (missed roadwork among answered roadwork).
            scrc_confidence: scrc: what decides answering: margin (from the decision threshold) or gate
                (phase 3, train_gate, is trained first and its scores are the confidence).
            min_test_mcc: Release gate on held-out val_test MCC (-1.0: none).
            checkpoint_root: s3:// prefix for training checkpoints (one per epoch, under the run's id):
                a preempted and retried training resumes from its last epoch. Empty: no checkpoints.
        """
        dataset = dsl.importer(artifact_uri=dataset_uri, artifact_class=dsl.Dataset, reimport=False)
        dataset.set_display_name("dataset")

        # The importer does not look at the data: a dataset rewritten in place keeps its URI. A never-cached
        # fingerprint of its listing feeds make_splits, so the cache key of every step follows the content.
        fingerprint = dataset_fingerprint(dataset_uri=dataset_uri)
        fingerprint.set_caching_options(False)
        fingerprint.set_display_name("dataset-fingerprint")
        splits = make_splits(
            dataset=dataset.output, seed=seed, dataset_fingerprint=fingerprint.outputs["fingerprint"]
        )

        train = train_baseline(
            dataset=dataset.output,
            splits=splits.outputs["splits"],
            backbone=backbone,
            pretrained=pretrained,
            weights_uri=weights_uri,
            freeze_backbone=freeze_backbone,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            image_size=image_size,
            seed=seed,
            augment=augment,
            challenge_views=challenge_views,
            checkpoint_root=checkpoint_root,
        )
        # Only training is retried: a preempted GPU node is worth another try. Bad input and the release
        # gate fail the same way every time (exit 2, checked before any work), and transient object-store
        # errors are already retried inside each step by botocore, so the other steps are not retried.
        train.set_retry(num_retries=1, backoff_duration="10s")
        # One policy is shipped, by name: phase 2 and its export by default, phase 5 and its export under
        # policy=scrc. (Each branch has its own export task: Kubeflow's local runner has no dsl.OneOf.)
        exports = {}

        def export(branch: str, policy_output):
            exports[branch] = export_bundle(
                phase1=train.outputs["model"],
                policy=policy_output,
                splits=splits.outputs["splits"],
                policy_type=branch.split("-")[0],
                min_test_mcc=min_test_mcc,
            )

        with dsl.If(policy == "threshold", name="threshold-policy"):
            sweep = sweep_thresholds(phase1=train.outputs["model"], max_fnr=max_fnr, views=calibrate_on)
            export("threshold", sweep.outputs["thresholds"])
        scrc_options = {"alpha": scrc_alpha, "delta": scrc_delta, "risk": scrc_risk, "views": calibrate_on}
        with dsl.Else(name="scrc-policy"):
            with dsl.If(scrc_confidence == "gate", name="gate-confidence"):
                gate = train_gate(
                    phase1=train.outputs["model"],
                    dataset=dataset.output,
                    splits=splits.outputs["splits"],
                    views=calibrate_on,
                    seed=seed,
                )
                gated = calibrate_scrc(
                    phase1=train.outputs["model"],
                    gate=gate.outputs["gate"],
                    confidence="gate",
                    **scrc_options,
                )
                export("scrc-gate", gated.outputs["scrc"])
            with dsl.Else(name="margin-confidence"):
                scrc = calibrate_scrc(phase1=train.outputs["model"], confidence="margin", **scrc_options)
                export("scrc", scrc.outputs["scrc"])

        steps = (fingerprint, splits, sweep, scrc, gated, *exports.values())
        for task in (train, gate, *steps):
            _with_credentials(task, options)
        for task in (train, gate):  # the training image's steps: GPU, placement, bigger requests
            _on_training_nodes(task, options)
        for task in steps:
            _with_resources(task, options.step_cpu, options.step_memory)

    return streetvision


streetvision = build_pipeline()
