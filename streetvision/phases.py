"""The pipeline's shape, in one place: every phase, what it reads, what it shows, where it runs.

A phase has one canonical name, its stem: the module ``streetvision.steps.<stem>``, the CLI command
``streetvision <stem with dashes>``, the Kubeflow component and task, the folder ``streetvision run``
writes, and the ``step`` in its manifest. ``phaseN`` is a documented alias for ``pipeline.phases``.

The CLI's step commands, ``streetvision run`` (order, inputs, up-to-date checks) and the step glue are
derived from :data:`PHASES`; a test checks the compiled Kubeflow pipeline's wiring against it, so a new
phase is added here and in its own step module and component.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DATASET = None  # an input that no phase produces: the dataset folder or prefix
UNUSED = ""  # what ``Config.source(name)`` returns for an optional input that this config does not read
WHEN_GIVEN = "when given"  # an optional input read whenever it is given (no setting decides)


@dataclass(frozen=True)
class Phase:
    stem: str
    number: int
    help: str
    # Input name (the CLI flag --<name>, run()'s keyword, the component's input) -> the producing phase's
    # stem, or DATASET, or several stems of which the step's config names one (``Config.source(name)``,
    # which may also say UNUSED for an input named in ``optional_inputs``).
    inputs: dict[str, str | tuple[str, ...] | None]
    image: str  # "base" (no torch) or "train"
    artifact: str  # the component output holding the step directory
    # The component's other outputs for the Kubeflow UI: output name -> KFP schema title.
    ui: dict[str, str] = field(default_factory=dict)
    input_help: dict[str, str] = field(default_factory=dict)
    optional: bool = False  # not in the default pipeline; named in pipeline.phases to run
    # Inputs read only under some config: input name -> the setting that reads it (for error messages),
    # or WHEN_GIVEN for one read whenever it is given.
    optional_inputs: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> str:
        return self.stem.replace("_", "-")

    @property
    def alias(self) -> str:
        return f"phase{self.number}"


PHASES: tuple[Phase, ...] = (
    Phase(
        "make_splits",
        0,
        "phase 0: stratified train/val_select/val_calib/val_test splits",
        {"dataset": DATASET},
        "base",
        "splits",
        input_help={"dataset": "dataset folder or s3:// prefix holding labels.csv"},
    ),
    Phase(
        "adapt_explora",
        4,
        "phase 4: ExPLoRA, self-supervised adaptation of a ViT backbone to the train split's images",
        {"dataset": DATASET, "splits": "make_splits"},
        "train",
        "adapted",
        {"metrics": "system.Metrics"},
        input_help={"splits": "make_splits output: only its train split's images are read"},
        optional=True,
    ),
    Phase(
        "train_baseline",
        1,
        "phase 1: train the timm + Lightning classifier",
        {"dataset": DATASET, "splits": "make_splits", "explora": "adapt_explora"},
        "train",
        "model",
        {"metrics": "system.Metrics"},
        input_help={
            "splits": "make_splits output directory or URI",
            "explora": "adapt_explora output: its adapted backbone is the starting point (optional)",
        },
        optional_inputs={"explora": WHEN_GIVEN},
    ),
    Phase(
        "sweep_thresholds",
        2,
        "phase 2: exact threshold sweep, max-MCC policy, report",
        {"phase1": "train_baseline"},
        "base",
        "thresholds",
        {
            "metrics": "system.Metrics",
            "classification": "system.ClassificationMetrics",
            "report": "system.Markdown",
        },
        input_help={"phase1": "train_baseline output directory or URI"},
    ),
    Phase(
        "train_gate",
        3,
        "phase 3: a learned gate that scores whether phase 1's decision is right (answer or defer)",
        {"phase1": "train_baseline", "dataset": DATASET, "splits": "make_splits"},
        "train",
        "gate",
        {"metrics": "system.Metrics", "report": "system.Markdown"},
        input_help={
            "phase1": "train_baseline output directory or URI",
            "splits": "the make_splits output phase 1 was trained on",
        },
        optional=True,
    ),
    Phase(
        "calibrate_scrc",
        5,
        "phase 5: temperature scaling and selective conformal risk control (answer or defer)",
        {"phase1": "train_baseline", "gate": ("train_gate", UNUSED)},
        "base",
        "scrc",
        {"metrics": "system.Metrics", "report": "system.Markdown"},
        input_help={
            "phase1": "train_baseline output directory or URI",
            "gate": "train_gate output (with scrc.confidence=gate): its scores are the confidence",
        },
        optional=True,
        optional_inputs={"gate": "scrc.confidence=gate"},
    ),
    Phase(
        "export_bundle",
        6,
        "phase 6: export a verified, portable bundle",
        {
            "phase1": "train_baseline",
            "policy": ("sweep_thresholds", "calibrate_scrc"),
            "splits": "make_splits",
        },
        "base",
        "bundle",
        {"test_metrics": "system.Metrics", "report": "system.Markdown"},
        input_help={
            "policy": "the policy step's output: sweep_thresholds, or calibrate_scrc with export.policy=scrc"
        },
    ),
)
BY_STEM = {p.stem: p for p in PHASES}
ALIASES = {p.alias: p.stem for p in PHASES}


def phase(stem: str) -> Phase:
    return BY_STEM[stem]


def producers(stem: str, config, given=()) -> dict[str, str | None]:
    """Input name -> the phase that must have produced it, for this step and its config: optional inputs
    this config does not read left out, and those read when given unless ``given`` names them."""
    phase = BY_STEM[stem]
    chosen = {
        name: config.source(name) if isinstance(made_by, tuple) else made_by
        for name, made_by in phase.inputs.items()
    }
    return {
        name: made_by
        for name, made_by in chosen.items()
        if made_by != UNUSED and (phase.optional_inputs.get(name) != WHEN_GIVEN or name in given)
    }
