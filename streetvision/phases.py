"""The pipeline's shape, in one place: every phase, what it reads, what it shows, where it runs.

A phase has one canonical name, its stem: the module ``streetvision.steps.<stem>``, the CLI command
``streetvision <stem with dashes>``, the Kubeflow component and task, the folder ``streetvision run``
writes, and the ``step`` in its manifest. Its output (the component's
artifact, and the input name that reads it) is the stem's noun: ``baseline``, ``splits``, ``gate``.

The CLI's step commands, ``streetvision run`` (order, inputs, up-to-date checks) and the step glue are
derived from :data:`PHASES`; a test checks the compiled Kubeflow pipeline's wiring against it, so a new
phase is added here and in its own step module and component.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DATASET = None  # an input that no phase produces: the dataset folder or prefix
UNUSED = ""  # a Choice's value for an optional input that this config does not read
WHEN_GIVEN = "when given"  # an optional input read whenever it is given (no setting decides)


@dataclass(frozen=True)
class Choice:
    """An input made by one of several phases, as a setting of the reading phase says: the setting's
    value -> the producing phase (or UNUSED: not read under that value)."""

    setting: str  # a dotted key of the reading phase's config, e.g. export.policy
    by_value: dict[str, str]

    def of(self, config) -> str:
        value = config
        for part in self.setting.split("."):
            value = getattr(value, part)
        return self.by_value[value]


@dataclass(frozen=True)
class Phase:
    stem: str
    help: str
    # Input name (the CLI flag --<name>, run()'s keyword, the component's input) -> the producing phase's
    # stem, or DATASET, or a Choice of stems by a setting of this phase's config.
    inputs: dict[str, str | Choice | None]
    image: str  # "base" (no torch) or "train"
    # The component's other outputs for the Kubeflow UI: output name -> KFP schema title.
    ui: dict[str, str] = field(default_factory=dict)
    input_help: dict[str, str] = field(default_factory=dict)
    optional: bool = False  # not in the default pipeline; named in pipeline.phases to run
    # Inputs read only under some config: input name -> the setting that reads it (for error messages),
    # or WHEN_GIVEN for one read whenever it is given.
    optional_inputs: dict[str, str] = field(default_factory=dict)
    checkpoints: bool = False  # takes --checkpoint-root (per-epoch checkpoints a retried task resumes from)
    # Inputs that must belong together, checked before any work: (a, b) means input a's manifest records
    # input b as its own b (the policy was swept on this train_baseline). A dataset and splits are checked by
    # content (``make_splits.split_dataset``).
    belongs: tuple[tuple[str, str], ...] = ()
    # Reads the dataset where it is (its index, ranged reads of what it needs), never a local copy of it:
    # on Kubeflow it takes the dataset's URI as a parameter (``dataset_uri``), which the launcher does not
    # download (it copies every input artifact into the pod before the command starts).
    in_place: bool = False
    # Its output is read where it is, streamed and verified as it streams in, never copied whole: on
    # Kubeflow the step commits straight to its artifact's URI and hands that URI on as the output parameter
    # ``<artifact>_uri``, which its readers take as the parameter ``<input>_uri`` instead of the artifact.
    streamed: bool = False
    gpu: bool = False  # trains or scores a network: placed on the training nodes, with the GPUs asked for
    # Local disk it needs beyond its outputs (a streaming cache, a packing window): on Kubeflow an emptyDir
    # of this size holds its temporary folder.
    scratch: str = ""

    @property
    def command(self) -> str:
        return self.stem.replace("_", "-")

    def by_uri(self, name: str) -> bool:
        """Whether input ``name`` is passed by its URI on Kubeflow (a dataset read in place, or a streamed
        phase's output), as the component parameter ``<name>_uri``, rather than as an artifact."""
        made_by = self.inputs[name]
        if made_by is None:
            return self.in_place
        return isinstance(made_by, str) and BY_STEM[made_by].streamed

    @property
    def artifact(self) -> str:
        """The component output holding the step folder, and the input name that reads it: the stem's
        noun (train_baseline -> baseline, calibrate_scrc -> scrc)."""
        return self.stem.partition("_")[2]


PHASES: tuple[Phase, ...] = (
    Phase(
        "make_splits",
        "stratified train/val_select/val_calib/val_test splits",
        {"dataset": DATASET},
        "base",
        input_help={
            "dataset": "dataset folder or s3:// prefix: labels.csv, parquet shards or a folder per class"
        },
        in_place=True,
    ),
    Phase(
        "pack_shards",
        "decode every image once and write each split as litdata chunks, for streaming",
        {"dataset": DATASET, "splits": "make_splits"},
        "train",
        {"metrics": "system.Metrics"},
        input_help={"splits": "make_splits output: the splits to pack, made from this dataset"},
        in_place=True,
        streamed=True,
        scratch="4Gi",  # a chunk per split being written and the window of images being decoded
    ),
    Phase(
        "adapt_explora",
        "ExPLoRA, self-supervised adaptation of a ViT backbone to the train split's images",
        {"shards": "pack_shards"},
        "train",
        {"metrics": "system.Metrics"},
        input_help={"shards": "pack_shards output: only its train split's images are read"},
        optional=True,
        checkpoints=True,
        gpu=True,
        scratch="10Gi",  # data.cache_bytes (8 GiB) and litdata's chunks in flight
    ),
    Phase(
        "train_baseline",
        "train the timm + Lightning classifier",
        {"shards": "pack_shards", "explora": "adapt_explora"},
        "train",
        {"metrics": "system.Metrics"},
        input_help={
            "shards": "pack_shards output directory or URI: the packed splits, streamed",
            "explora": "adapt_explora output: its adapted backbone is the starting point (optional)",
        },
        optional_inputs={"explora": WHEN_GIVEN},
        checkpoints=True,
        belongs=(("explora", "shards"),),
        gpu=True,
        scratch="10Gi",
    ),
    Phase(
        "sweep_thresholds",
        "exact threshold sweep, max-MCC policy, report",
        {"baseline": "train_baseline"},
        "base",
        {
            "metrics": "system.Metrics",
            "classification": "system.ClassificationMetrics",
            "report": "system.Markdown",
        },
        input_help={"baseline": "train_baseline output directory or URI"},
    ),
    Phase(
        "train_gate",
        "a learned gate that scores whether train_baseline's decision is right (answer or defer)",
        {"baseline": "train_baseline", "shards": "pack_shards"},
        "train",
        {"metrics": "system.Metrics", "report": "system.Markdown"},
        input_help={
            "baseline": "train_baseline output directory or URI",
            "shards": "the pack_shards output train_baseline was trained on",
        },
        optional=True,
        belongs=(("baseline", "shards"),),
        gpu=True,
        scratch="10Gi",
    ),
    Phase(
        "calibrate_scrc",
        "temperature scaling and selective conformal risk control (answer or defer)",
        {
            "baseline": "train_baseline",
            "gate": Choice("scrc.confidence", {"gate": "train_gate", "margin": UNUSED}),
        },
        "base",
        {"metrics": "system.Metrics", "report": "system.Markdown"},
        input_help={
            "baseline": "train_baseline output directory or URI",
            "gate": "train_gate output (with scrc.confidence=gate): its scores are the confidence",
        },
        optional=True,
        optional_inputs={"gate": "scrc.confidence=gate"},
        belongs=(("gate", "baseline"),),
    ),
    Phase(
        "export_bundle",
        "export a verified, portable bundle",
        {
            "baseline": "train_baseline",
            "policy": Choice("export.policy", {"threshold": "sweep_thresholds", "scrc": "calibrate_scrc"}),
            "splits": "make_splits",
        },
        "base",
        {"test_metrics": "system.Metrics", "report": "system.Markdown"},
        belongs=(("policy", "baseline"), ("baseline", "splits")),
        input_help={
            "policy": "the policy step's output: sweep_thresholds, or calibrate_scrc with export.policy=scrc"
        },
    ),
)
BY_STEM = {p.stem: p for p in PHASES}


@dataclass(frozen=True)
class Shared:
    """A setting of the whole run: set once (``seed=4``), it reaches every phase listed, each under its
    own key. A phase's own spelling (``splits.seed=2``, ``train_gate.seed=3``) sets that phase alone and
    wins there, except where phases must agree (``agree``: train_baseline trains the backbone adapt_explora adapted)."""

    name: str
    keys: dict[str, str]  # stem -> the key this setting is in that phase's config
    agree: bool = False


_TRAINING = ("adapt_explora", "train_baseline")
SHARED: tuple[Shared, ...] = (
    Shared("seed", {"make_splits": "splits.seed", "adapt_explora": "seed", "train_baseline": "seed",
                    "train_gate": "seed", "calibrate_scrc": "scrc.seed"}),  # fmt: skip
    Shared("views", {"train_gate": "gate.views", "sweep_thresholds": "sweep.views", "calibrate_scrc": "scrc.views"}),
    Shared("model.backbone", dict.fromkeys(_TRAINING, "model.backbone"), agree=True),
    *(Shared(key, dict.fromkeys(_TRAINING, key)) for key in ("model.pretrained", "model.weights", "data.image_size")),
    *(Shared(key, dict.fromkeys((*_TRAINING, "train_gate"), key))
      for key in ("data.batch_size", "data.num_workers", "trainer.accelerator", "trainer.precision")),
    *(Shared(key, dict.fromkeys(_TRAINING, key)) for key in ("trainer.devices", "trainer.num_nodes", "trainer.strategy")),
)  # fmt: skip
SHARED_BY_NAME = {s.name: s for s in SHARED}

# What switches the optional phases on, the same on both sides: the last phase reads the policy that
# export.policy names, calibrate_scrc reads the gate under scrc.confidence=gate, and train_baseline reads
# adapt_explora's backbone under pipeline.explora=true. See :func:`needed`. On Kubeflow they are compile-time
# choices (one pipeline file per shipped variant), so that each compiled task appears once.
EXPLORA_SWITCH = "pipeline.explora"
SWITCHES: dict[str, str] = {
    "explora": EXPLORA_SWITCH,
    "policy": "export.policy",
    "confidence": "scrc.confidence",
}


@dataclass(frozen=True)
class Parameter:
    """A Kubeflow pipeline parameter: the same setting for ``streetvision run`` (a shared setting, a key,
    its phase's prefix where another phase owns the unprefixed key, or a flag of ``streetvision run``),
    and its published description. Its type and default are the step's own (the component's)."""

    setting: str
    help: str


# Every Kubeflow pipeline parameter but the dataset's URI. A compiled variant has those that reach one of
# its phases; a test compiles each variant and checks every one reaches the same phases and keys as its
# local setting.
PARAMETERS: dict[str, Parameter] = {
    "backbone": Parameter("model.backbone", "timm model name of the backbone (adapt_explora and train_baseline)."),
    "pretrained": Parameter("model.pretrained", "Load the hub's pretrained backbone weights."),
    "weights_uri": Parameter("model.weights", "Backbone weights file (s3:// URI) used instead of the hub; empty for the hub."),
    "freeze_backbone": Parameter("model.freeze_backbone", "Train the head only."),
    "max_side": Parameter("pack.max_side", "pack_shards: images whose shorter side is longer are scaled down to it (0: the original bytes)."),
    "epochs": Parameter("trainer.max_epochs", "Maximum training epochs of train_baseline (early stopping on val_select MCC may end sooner)."),
    "lr": Parameter("model.lr", "Learning rate of train_baseline."),
    "batch_size": Parameter("data.batch_size", "Images per batch (adapt_explora, train_baseline and train_gate)."),
    "image_size": Parameter("data.image_size", "Input side in pixels (0: the backbone's own)."),
    "seed": Parameter("seed", "Seed for the splits, the training phases and calibrate_scrc's split of val_calib."),
    "augment": Parameter("data.augment", "Training augmentation: challenge (the subnet validator's views), timm, or none."),
    "challenge_views": Parameter("eval.challenge_views", "Validator-style views per val_calib and val_test image (0: none)."),
    "explora_epochs": Parameter("adapt_explora.trainer.max_epochs", "adapt_explora: epochs of self-distillation."),
    "explora_rank": Parameter("explora.rank", "adapt_explora: LoRA rank on Q and V (0: the preset for the backbone's width)."),
    "explora_unfrozen_blocks": Parameter("explora.unfrozen_blocks", "adapt_explora: the last blocks trained fully."),
    "explora_extra_images": Parameter("explora.extra_images", "adapt_explora: an s3:// prefix of unlabelled street images added to the train split's (empty: none)."),
    "calibrate_on": Parameter("views", "What sweep_thresholds, train_gate and calibrate_scrc fit on: challenge (validator-style views) or clean."),
    "max_fnr": Parameter("sweep.max_fnr", "sweep_thresholds: largest false-negative rate on val_calib (1.0: none)."),
    "scrc_alpha": Parameter("scrc.alpha", "calibrate_scrc: the risk level of the answered images."),
    "scrc_delta": Parameter("scrc.delta", "calibrate_scrc: 0.0 controls the risk in expectation; otherwise with probability 1 - delta."),
    "scrc_risk": Parameter("scrc.risk", "calibrate_scrc: error (wrong answers) or fnr (missed roadwork among answered roadwork)."),
    "min_test_mcc": Parameter("export.min_test_mcc", "Release gate on held-out val_test MCC (-1.0: none)."),
    "checkpoint_root": Parameter("--checkpoint-root", "s3:// prefix for training checkpoints (one per epoch, under the run's id): a preempted and retried training resumes from its last epoch. Empty: none."),
}  # fmt: skip


def phase(stem: str) -> Phase:
    return BY_STEM[stem]


def needed(configs: dict, explora: bool) -> list[str]:
    """The phases a run executes, in run order: the last phase and, transitively, what each reads under
    these configs (stem -> its config); adapt_explora only with ``explora``."""
    want: set[str] = set()
    todo = [PHASES[-1].stem]
    while todo:
        stem = todo.pop()
        want.add(stem)
        given = {"explora"} if explora else set()
        todo += [p for p in producers(stem, configs[stem], given).values() if p is not None and p not in want]
    return [p.stem for p in PHASES if p.stem in want]


def producers(stem: str, config, given=()) -> dict[str, str | None]:
    """Input name -> the phase that must have produced it, for this step and its config: optional inputs
    this config does not read left out, and those read when given unless ``given`` names them."""
    phase = BY_STEM[stem]
    chosen = {
        name: made_by.of(config) if isinstance(made_by, Choice) else made_by
        for name, made_by in phase.inputs.items()
    }
    return {
        name: made_by
        for name, made_by in chosen.items()
        if made_by != UNUSED and (phase.optional_inputs.get(name) != WHEN_GIVEN or name in given)
    }


def choices(stem: str, name: str) -> dict[str, str]:
    """The setting's values -> the producing phase, of an input that is a Choice."""
    made_by = BY_STEM[stem].inputs[name]
    assert isinstance(made_by, Choice), (stem, name)
    return made_by.by_value
