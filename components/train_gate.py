from kfp import dsl

from components.defaults import GATE
from components.images import ENTRYPOINT, KFP_RUN, TRAIN_IMAGE


@dsl.container_component
def train_gate(
    baseline: dsl.Input[dsl.Model],
    shards_uri: str,
    gate: dsl.Output[dsl.Model],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.Markdown],
    views: str = GATE.gate.views,
    train_views: int = GATE.gate.train_views,
    hidden: int = GATE.gate.hidden,
    epochs: int = GATE.trainer.max_epochs,
    seed: int = GATE.seed,
    batch_size: int = GATE.data.batch_size,
):
    """train_gate: a learned gate that scores whether train_baseline's decision on an image is right (answer or defer).

    An MLP over the frozen train_baseline backbone's features and logit, fitted on train and early-stopped on
    val_select only; train_baseline's weights are never changed.

    Args:
        baseline: train_baseline output.
        shards_uri: URI of the pack_shards output train_baseline was trained on (streamed).
        views: What the gate learns on: challenge (validator-style views of train and val_select) or clean.
        train_views: Challenge views per train and val_select image.
        hidden: Hidden units of the MLP.
        epochs: Maximum epochs; early stopping on the val_select loss may end sooner.
        seed: Seed for the views, initialisation and shuffling.
        batch_size: Images per batch through the train_baseline backbone.

    Returns:
        gate: Step directory: gate.safetensors, model.json, gate scores for val_select, val_calib and
            val_test (and their challenge views), history.csv, metrics.json, report.md.
        metrics: The gate's AUROC for correctness and AURC on val_select, beside the margin's.
        report: The Markdown report.
    """
    return dsl.ContainerSpec(
        image=TRAIN_IMAGE,
        command=[*ENTRYPOINT, "train-gate"],
        args=[
            "--baseline",
            baseline.path,
            "--shards",
            shards_uri,
            "--out",
            gate.path,
            *KFP_RUN,
            dsl.ConcatPlaceholder(["gate.views=", views]),
            dsl.ConcatPlaceholder(["gate.train_views=", train_views]),
            dsl.ConcatPlaceholder(["gate.hidden=", hidden]),
            dsl.ConcatPlaceholder(["trainer.max_epochs=", epochs]),
            dsl.ConcatPlaceholder(["seed=", seed]),
            dsl.ConcatPlaceholder(["data.batch_size=", batch_size]),
        ],
    )
