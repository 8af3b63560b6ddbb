from kfp import dsl

from components.images import BASE_IMAGE, ENTRYPOINT, KFP_RUN


@dsl.container_component
def sweep_thresholds(
    baseline: dsl.Input[dsl.Model],
    thresholds: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    classification: dsl.Output[dsl.ClassificationMetrics],
    report: dsl.Output[dsl.Markdown],
    max_fnr: float = 1.0,
    max_fpr: float = 1.0,
    min_precision: float = 0.0,
    views: str = "challenge",
):
    """sweep_thresholds: exact threshold sweep on val_calib; the max-MCC threshold policy, its curves and report.

    Args:
        baseline: train_baseline output (only its val_calib logits and labels are read).
        views: Fit on val_calib as it is (clean) or on its validator-style views (challenge).
        max_fnr: Largest false-negative rate the policy may have (1.0: no constraint).
        max_fpr: Largest false-positive rate the policy may have (1.0: no constraint).
        min_precision: Smallest precision the policy may have (0.0: no constraint).

    Returns:
        thresholds: Step directory: thresholds.json (the policy), sweep.csv, risk_coverage.csv, plots, report.
        metrics: MCC, accuracy, FNR, FPR, threshold and AURC at the policy.
        classification: Confusion matrix at the threshold and the ROC curve.
        report: The Markdown report with its plots.
    """
    return dsl.ContainerSpec(
        image=BASE_IMAGE,
        command=[*ENTRYPOINT, "sweep-thresholds"],
        args=[
            "--baseline",
            baseline.path,
            "--out",
            thresholds.path,
            *KFP_RUN,
            dsl.ConcatPlaceholder(["sweep.max_fnr=", max_fnr]),
            dsl.ConcatPlaceholder(["sweep.max_fpr=", max_fpr]),
            dsl.ConcatPlaceholder(["sweep.min_precision=", min_precision]),
            dsl.ConcatPlaceholder(["sweep.views=", views]),
        ],
    )
