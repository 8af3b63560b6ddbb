from typing import Optional

from kfp import dsl

from components.images import BASE_IMAGE, ENTRYPOINT, KFP_RUN


@dsl.container_component
def calibrate_scrc(
    baseline: dsl.Input[dsl.Model],
    scrc: dsl.Output[dsl.Artifact],
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.Markdown],
    alpha: float = 0.05,
    delta: float = 0.0,
    risk: str = "error",
    views: str = "challenge",
    gate: Optional[dsl.Input[dsl.Artifact]] = None,  # noqa: UP045 - the KFP SDK reads Optional
    confidence: str = "margin",
    seed: int = 0,
):
    """calibrate_scrc: temperature scaling and selective conformal risk control on val_calib (answer or defer).

    Args:
        baseline: train_baseline output (only its val_calib logits and labels are read).
        alpha: The risk level the answered images are held to.
        delta: 0.0: the risk is controlled in expectation (Conformal Risk Control); otherwise it holds
            with probability 1 - delta (Learn then Test).
        risk: error (wrong answers) or fnr (missed roadwork among answered roadwork images).
        views: Calibrate on val_calib's challenge views (one per image) or its clean images.
        gate: train_gate output, with confidence=gate.
        confidence: What decides answering: margin (from the decision threshold) or gate (train_gate's scores).
        seed: Seed of val_calib's split into the temperature's part and lambda's.

    Returns:
        scrc: Step directory: scrc.json (temperature, thresholds, alpha, delta, coverage), plot, report,
            and with a gate its weights and val_test scores.
        metrics: Temperature, thresholds, coverage, risk and calibration errors.
        report: The Markdown report.
    """
    return dsl.ContainerSpec(
        image=BASE_IMAGE,
        command=[*ENTRYPOINT, "calibrate-scrc"],
        args=[
            "--baseline",
            baseline.path,
            dsl.IfPresentPlaceholder(input_name="gate", then=["--gate", gate.path]),
            "--out",
            scrc.path,
            *KFP_RUN,
            dsl.ConcatPlaceholder(["scrc.alpha=", alpha]),
            dsl.ConcatPlaceholder(["scrc.delta=", delta]),
            dsl.ConcatPlaceholder(["scrc.risk=", risk]),
            dsl.ConcatPlaceholder(["scrc.views=", views]),
            dsl.ConcatPlaceholder(["scrc.confidence=", confidence]),
            dsl.ConcatPlaceholder(["scrc.seed=", seed]),
        ],
    )
