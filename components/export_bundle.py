from kfp import dsl

from components.images import BASE_IMAGE, ENTRYPOINT, KFP_RUN


@dsl.container_component
def export_bundle(
    baseline: dsl.Input[dsl.Model],
    policy: dsl.Input[dsl.Artifact],
    splits: dsl.Input[dsl.Artifact],
    bundle: dsl.Output[dsl.Model],
    test_metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.Markdown],
    policy_type: str = "threshold",
    min_test_mcc: float = -1.0,
):
    """export_bundle: export model, policy and splits as a portable bundle, with held-out val_test metrics.

    Args:
        baseline: train_baseline output.
        policy: The one policy step output to bundle: sweep_thresholds, or calibrate_scrc.
        policy_type: Which it is: threshold or scrc.
        splits: make_splits output.
        min_test_mcc: Release gate: fail without a bundle when held-out MCC is lower (-1.0: no gate).

    Returns:
        bundle: bundle.json plus the files it names (relative paths, sha256 each), and manifest.json.
        test_metrics: Held-out val_test metrics of the bundled model and policy, and the simulated subnet
            reward per view.
        report: Held-out report: metrics per view (clean, challenge) and challenge level, and reward.
    """
    return dsl.ContainerSpec(
        image=BASE_IMAGE,
        command=[*ENTRYPOINT, "export-bundle"],
        args=[
            "--baseline",
            baseline.path,
            "--policy",
            policy.path,
            "--splits",
            splits.path,
            "--out",
            bundle.path,
            *KFP_RUN,
            dsl.ConcatPlaceholder(["export.policy=", policy_type]),
            dsl.ConcatPlaceholder(["export.min_test_mcc=", min_test_mcc]),
        ],
    )
