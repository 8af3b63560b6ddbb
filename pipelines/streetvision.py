"""The default StreetVision pipeline: make_splits -> train_baseline -> sweep_thresholds -> export_bundle;
with ``policy=scrc`` calibrate_scrc (after train_gate with ``scrc_confidence=gate``) instead of the sweep,
and with ``explora=true`` adapt_explora before train_baseline. What follows training is one sub-pipeline,
``calibrate_and_export``, run in either branch of ``explora``.

``build_pipeline(options)`` returns the pipeline function; :class:`PlatformOptions` holds what is decided
at compile time (credentials Secret, GPU request, node selector, tolerations, CPU and memory). The committed
``pipelines/streetvision.yaml`` is ``build_pipeline()`` with the defaults (CPU, no selectors).
"""

from dataclasses import dataclass, field

from kfp import dsl, kubernetes

from components.adapt_explora import adapt_explora
from components.calibrate_scrc import calibrate_scrc
from components.dataset_fingerprint import dataset_fingerprint
from components.defaults import EXPLORA, TRAIN
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

    def training(task):
        """A step of the training image: GPU, placement, bigger requests, credentials."""
        return _on_training_nodes(_with_credentials(task, options), options)

    def step(task):
        """A light step: the base image's requests, credentials."""
        return _with_resources(_with_credentials(task, options), options.step_cpu, options.step_memory)

    @dsl.pipeline(
        name="calibrate-and-export",
        description="Phase 2 (or 3 and 5) on a trained phase 1, and the export of the one policy chosen.",
    )
    def calibrate_and_export(
        phase1: dsl.Input[dsl.Model],
        dataset: dsl.Input[dsl.Dataset],
        splits: dsl.Input[dsl.Artifact],
        policy: str,
        calibrate_on: str,
        max_fnr: float,
        scrc_alpha: float,
        scrc_delta: float,
        scrc_risk: str,
        scrc_confidence: str,
        min_test_mcc: float,
        seed: int,
    ):
        """The policy branches of the StreetVision pipeline, as its parameters of the same names say."""

        # One policy is shipped, by name: phase 2 and its export by default, phase 5 and its export under
        # policy=scrc. (Each branch has its own export task: Kubeflow's local runner has no dsl.OneOf.)
        def export(kind: str, policy_output):
            step(export_bundle(phase1=phase1, policy=policy_output, splits=splits, policy_type=kind,
                               min_test_mcc=min_test_mcc))  # fmt: skip

        with dsl.If(policy == "threshold", name="threshold-policy"):
            sweep = step(sweep_thresholds(phase1=phase1, max_fnr=max_fnr, views=calibrate_on))
            export("threshold", sweep.outputs["thresholds"])
        scrc_options = {"alpha": scrc_alpha, "delta": scrc_delta, "risk": scrc_risk, "views": calibrate_on}
        with dsl.Else(name="scrc-policy"):
            with dsl.If(scrc_confidence == "gate", name="gate-confidence"):
                gate = training(train_gate(phase1=phase1, dataset=dataset, splits=splits, views=calibrate_on,
                                           seed=seed))  # fmt: skip
                gated = step(calibrate_scrc(phase1=phase1, gate=gate.outputs["gate"], confidence="gate",
                                            **scrc_options))  # fmt: skip
                export("scrc", gated.outputs["scrc"])
            with dsl.Else(name="margin-confidence"):
                scrc = step(calibrate_scrc(phase1=phase1, confidence="margin", **scrc_options))
                export("scrc", scrc.outputs["scrc"])

    @dsl.pipeline(
        name="streetvision",
        description="Train, calibrate and export the StreetVision roadwork classifier "
        "(make_splits -> [adapt_explora ->] train_baseline -> sweep_thresholds or calibrate_scrc -> export_bundle).",
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
        explora: bool = False,
        explora_epochs: int = EXPLORA.trainer.max_epochs,
        explora_rank: int = EXPLORA.explora.rank,
        explora_unfrozen_blocks: int = EXPLORA.explora.unfrozen_blocks,
        explora_extra_images: str = EXPLORA.explora.extra_images,
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
            explora: Run phase 4 (adapt_explora) first: ExPLoRA self-supervised adaptation of the ViT backbone
                to the dataset's train images, which phase 1 then starts from.
            explora_epochs: phase 4: epochs of self-distillation.
            explora_rank: phase 4: LoRA rank on Q and V (0: the preset for the backbone's width).
            explora_unfrozen_blocks: phase 4: the last blocks trained fully.
            explora_extra_images: phase 4: an s3:// prefix of unlabelled street images added to the train
                split's (empty: none).
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
            checkpoint_root: s3:// prefix for training checkpoints (one per epoch, under the run's id, for
                phases 1 and 4): a preempted and retried training resumes from its last epoch. Empty: none.
        """
        dataset = dsl.importer(artifact_uri=dataset_uri, artifact_class=dsl.Dataset, reimport=False)
        dataset.set_display_name("dataset")

        # The importer does not look at the data: a dataset rewritten in place keeps its URI. A never-cached
        # fingerprint of its listing feeds make_splits, so the cache key of every step follows the content.
        fingerprint = step(dataset_fingerprint(dataset_uri=dataset_uri))
        fingerprint.set_caching_options(False)
        fingerprint.set_display_name("dataset-fingerprint")
        splits = step(make_splits(dataset=dataset.output, seed=seed,
                                  dataset_fingerprint=fingerprint.outputs["fingerprint"]))  # fmt: skip
        backbone_options = {"backbone": backbone, "pretrained": pretrained, "weights_uri": weights_uri,
                            "image_size": image_size, "batch_size": batch_size, "seed": seed,
                            "checkpoint_root": checkpoint_root}  # fmt: skip

        def train_and_ship(explora_output=None) -> None:
            """Phase 1 (from phase 4's backbone when given), then the policy and its export."""
            train = training(
                train_baseline(
                    dataset=dataset.output,
                    splits=splits.outputs["splits"],
                    **({"explora": explora_output} if explora_output is not None else {}),
                    freeze_backbone=freeze_backbone,
                    epochs=epochs,
                    lr=lr,
                    augment=augment,
                    challenge_views=challenge_views,
                    **backbone_options,
                )
            )
            # Only training is retried: a preempted GPU node is worth another try. Bad input and the release
            # gate fail the same way every time (exit 2, checked before any work), and transient object-store
            # errors are already retried inside each step by botocore, so the other steps are not retried.
            train.set_retry(num_retries=1, backoff_duration="10s")
            calibrate_and_export(
                phase1=train.outputs["model"], dataset=dataset.output, splits=splits.outputs["splits"],
                policy=policy, calibrate_on=calibrate_on, max_fnr=max_fnr, scrc_alpha=scrc_alpha,
                scrc_delta=scrc_delta, scrc_risk=scrc_risk, scrc_confidence=scrc_confidence,
                min_test_mcc=min_test_mcc, seed=seed,
            )  # fmt: skip

        # Phase 4 feeds phase 1 only under explora=true; each branch trains and ships on its own (no OneOf).
        with dsl.If(explora == True, name="explora"):  # noqa: E712 - a KFP condition, not a Python test
            adapt = training(
                adapt_explora(
                    dataset=dataset.output,
                    splits=splits.outputs["splits"],
                    epochs=explora_epochs,
                    rank=explora_rank,
                    unfrozen_blocks=explora_unfrozen_blocks,
                    extra_images=explora_extra_images,
                    **backbone_options,
                )
            )
            adapt.set_retry(num_retries=1, backoff_duration="10s")
            train_and_ship(adapt.outputs["adapted"])
        with dsl.Else(name="no-explora"):
            train_and_ship()

    return streetvision


streetvision = build_pipeline()
