"""Fault injection: bad input, tampering, kills, a dying object store and concurrent writers.

Run alone with ``pytest -m faults -s`` to see the counts each matrix prints. Every row must hold in every
case: a bad input exits non-zero with exactly one line on stderr and commits nothing; a tampered commit
is refused by ``verify`` and by every loader, naming the file; a killed step leaves no manifest or one that
verifies, and its rerun succeeds; a killed object store leaves the step uncommitted; two writers of one
output never produce a mixed commit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from baseline_fake import reseal
from conftest import EXPLORA, GATE, ON_EXPLORA, PACK, TINY_TRAIN, one_line, run_cli, step_commands

from streetvision.io.manifests import MANIFEST, verify_dir
from streetvision.io.outputs import StepOutputs

pytestmark = [pytest.mark.faults, pytest.mark.slow]

STEP_OF = {
    "splits": "make_splits",
    "shards": "pack_shards",
    "baseline": "train_baseline",
    "policy": "sweep_thresholds",
    "bundle": "export_bundle",
    "gate": "train_gate",
    "explora": "adapt_explora",
}


def fingerprint(world) -> dict[str, str]:
    """What every committed fixture holds now; compared before and after the matrices."""
    return {k: verify_dir(world[k], STEP_OF[k]).self_sha256 for k in STEP_OF}


# ---------------------------------------------------------------------------------------------------------
# Bad input


def _bad_datasets(world, base: Path) -> list[tuple[str, Path, str]]:
    """(name, dataset folder, what the error names) for broken copies of the demo dataset."""
    src = world["dataset"]
    cases = []

    def variant(name: str, edit, expect: str):
        d = base / f"ds-{name}"
        shutil.copytree(src, d)
        edit(d)
        cases.append((name, d, expect))

    lines = (src / "labels.csv").read_text().splitlines()
    first = lines[1].split(",")[0]
    variant("non-utf8", lambda d: (d / "labels.csv").write_bytes(b"image,label\n\xff\xfe.jpg,1\n"), "UTF-8")
    variant("no-index", lambda d: (d / "labels.csv").unlink(), "labels.csv")
    variant("bad-header", lambda d: (d / "labels.csv").write_text("path,y\na.jpg,1\n"), "header")
    variant("empty-index", lambda d: (d / "labels.csv").write_text("image,label\n"), "empty index")
    variant("label-2", lambda d: (d / "labels.csv").write_text("\n".join([*lines, f"{first},2"])), "label")
    variant("missing-image", lambda d: (d / first).unlink(), "missing file")
    variant("escaping", lambda d: (d / "labels.csv").write_text("image,label\n../x.jpg,1\n"), "escaping")
    variant(
        "duplicate",
        lambda d: (d / "labels.csv").write_text("\n".join([*lines, lines[1]]) + "\n"),
        "duplicate",
    )
    alias = "\n".join([*lines, f"./{first},{1 - int(lines[1].split(',')[1])}"]) + "\n"
    variant("alias-dot", lambda d: (d / "labels.csv").write_text(alias), "duplicate")
    variant(
        "alias-slashes",
        lambda d: (d / "labels.csv").write_text(alias.replace(f"./{first}", first.replace("/", "//"))),
        "duplicate",
    )
    variant(
        "nul-path", lambda d: (d / "labels.csv").write_text("image,label\nimages/a\x00.jpg,1\n"), "escaping"
    )
    variant("truncated", lambda d: (d / first).write_bytes((d / first).read_bytes()[:100]), "truncated")
    variant("not-an-image", lambda d: (d / first).write_text("hello"), "unreadable")
    return cases


IMAGE_CONTENT = ("truncated", "not-an-image")  # bad bytes, found by the one phase that decodes: pack_shards

CONFIG_CASES = {
    "make_splits": [
        "splits.ratios=[nan,0.2,0.2,0.2]", "splits.ratios=[0.5,0.5]", "splits.ratios=[0.6,0.2,0.2,0.2]",
        "splits.ratios=[-0.1,0.5,0.3,0.3]", "splits.ratios=[1,0,0,0]", "splits.ratios=[a,b,c,d]",
        "splits.ratios=5", "splits.ratios=[inf,0,0,0]", "splits.seed=-1", "splits.seed=4294967296",
        "splits.seed=abc", "splits.seed=1.5", "splits.seed=nan", "splits.bogus=1", "splits=3",
        "splits.ratios={a:1}", "splits.ratios=[0.25,0.25", "splits.seed=99999999999999999999",
    ],
    "train_baseline": [
        "model.lr=-1", "model.lr=0", "model.lr=nan", "model.lr=inf", "model.lr=abc", "model.lr=100",
        "model.dropout=2", "model.dropout=-0.1", "model.dropout=1", "model.dropout=nan",
        "model.weight_decay=-1", "model.weight_decay=nan", "model.warmup_epochs=-1", "model.warmup_epochs=nan",
        'model.backbone=""', "model.pretrained=maybe", "model.freeze_backbone=2", "data.batch_size=0",
        "data.batch_size=-1", "data.batch_size=abc", "data.batch_size=1.5", "data.num_workers=-1",
        "data.batch_size=99999999999999999999", "data.num_workers=100000",
        "data.image_size=-1", "data.image_size=8", "data.image_size=5000", "data.image_size=abc",
        "data.augment=perhaps", "data.augment=true", "eval.challenge_views=-1", "eval.challenge_views=65",
        "eval.challenge_views=abc", "trainer.max_epochs=0", "trainer.max_epochs=-1", "trainer.max_epochs=abc",
        "trainer.patience=-1", "trainer.accelerator=bogus", "trainer.accelerator=", "trainer.devices=abc",
        "trainer.devices=0", "trainer.devices=[a]", "trainer.devices=1.5", "trainer.devices=",
        "trainer.precision=bogus", "trainer.precision=8", "trainer.precision=", "trainer.strategy=bogus",
        "trainer.strategy=", "trainer.cache_features=maybe", "seed=-1", "seed=abc", "model.unknown=1",
        "trainer=1",
    ],
    "sweep_thresholds": [
        "sweep.max_fnr=1.5", "sweep.max_fnr=-0.1", "sweep.max_fnr=nan", "sweep.max_fnr=abc",
        "sweep.max_fnr=inf", "sweep.max_fpr=2", "sweep.max_fpr=nan", "sweep.min_precision=-1",
        "sweep.min_precision=nan", "sweep.optimize=f1", "sweep.optimize=", "roc_points=1", "roc_points=0",
        "roc_points=-3", "roc_points=abc", "sweep.bogus=1", "sweep.views=perhaps", "sweep.views=",
    ],
    "train_gate": [
        "gate.hidden=0", "gate.hidden=abc", "gate.hidden=1.5", "gate.dropout=1", "gate.dropout=nan", "gate.lr=0",
        "gate.lr=nan", "gate.lr=inf", "gate.weight_decay=-1", "gate.batch_size=0", "gate.views=bogus",
        "gate.views=", "gate.train_views=0", "gate.train_views=65", "gate.bogus=1", "gate=3",
        "train_gate.trainer.max_epochs=0", "train_gate.trainer.patience=-1", "train_gate.trainer.accelerator=bogus",
        "train_gate.trainer.precision=bogus", "train_gate.trainer.devices=2", "train_gate.data.batch_size=0",
        "train_gate.data.num_workers=-1", "train_gate.seed=-1",
    ],
    "adapt_explora": [
        "explora.rank=-1", "explora.rank=abc", "explora.alpha=-1", "explora.unfrozen_blocks=-1", "explora.prototypes=1",
        "explora.head_hidden=0", "explora.bottleneck=0", "explora.lr=0", "explora.lr=nan", "explora.weight_decay=-1",
        "explora.warmup_epochs=-1", "explora.teacher_momentum=1", "explora.center_momentum=-0.1",
        "explora.student_temp=0", "explora.teacher_temp=nan", "explora.koleo=-1", "explora.gradient_checkpointing=2",
        "explora.bogus=1", "explora=3", "adapt_explora.data.batch_size=1", "adapt_explora.data.local_crops=33",
        "adapt_explora.data.local_size=8", "adapt_explora.data.image_size=5000", "adapt_explora.trainer.max_epochs=0",
        "adapt_explora.trainer.devices=abc", "adapt_explora.trainer.precision=8", 'adapt_explora.model.backbone=""',
        "adapt_explora.seed=-1",
    ],
    "calibrate_scrc": [
        "scrc.alpha=0", "scrc.alpha=1", "scrc.alpha=-0.1", "scrc.alpha=nan", "scrc.alpha=abc", "scrc.delta=-0.1",
        "scrc.delta=1.5", "scrc.delta=nan", "scrc.risk=bogus", "scrc.views=bogus", "scrc.fit_fraction=0",
        "scrc.fit_fraction=1", "scrc.seed=-1", "scrc.bogus=1", "scrc.confidence=bogus", "scrc.confidence=",
    ],
    "export_bundle": [
        "export.min_test_mcc=2", "export.min_test_mcc=-2", "export.min_test_mcc=nan", "export.min_test_mcc=abc",
        "export.min_test_mcc=inf", "export.bogus=1",
    ],
}  # fmt: skip
RUNNER_CASES = [
    "pipeline.explora=maybe", "pipeline.phases=[bogus]", "pipeline.phases=[phase9]", "pipeline.phases=3",
    "pipeline.phases={a:1}", "demo.n=1e20",
    "pipeline.phases=[make_splits,train_baseline,train_gate,calibrate_scrc]",
    "demo.n=4", "demo.n=0", "demo.n=-1", "demo.n=abc", "demo.size=0", "demo.size=8", "demo.size=99999",
    "demo.seed=-1", "bogus.key=1", "noequals",
]  # fmt: skip


def _key(override: str) -> str:
    return override.split("=", 1)[0] if "=" in override else override


def bad_inputs(world, base: Path) -> list[tuple[str, list, str]]:
    """Every bad input: (case id, argv with {out} for a fresh output folder, what stderr must name)."""
    w = {k: str(v) for k, v in world.items()}
    cases: list[tuple[str, list, str]] = []
    step_argv = step_commands(world)
    for stem, overrides in CONFIG_CASES.items():
        for o in overrides:
            # "train_gate.trainer.max_epochs=0": how `run` addresses a key that train_baseline also has.
            own = o.removeprefix(f"{stem}.")
            cases.append((f"{stem}:{own}", [*step_argv[stem], "--out", "{out}", own], _key(own)))
            cases.append(
                (f"run:{o}", ["run", "--out", "{out}", "--dataset", w["dataset"], *TINY_TRAIN, o], _key(own))
            )
    for o in RUNNER_CASES:
        cases.append((f"run:{o}", ["run", "--out", "{out}", *TINY_TRAIN, o], _key(o)))
    import torch

    # Hardware that is not there and a strategy that is not installed: one line from the step, no traceback.
    for o in [
        "trainer.strategy=deepspeed",
        *([] if torch.cuda.is_available() else ["trainer.accelerator=gpu"]),
    ]:
        cases.append((f"train_baseline:{o}", [*step_argv["train_baseline"], "--out", "{out}", o], o))

    # Inputs that are missing, a file, not committed, or another step's commit.
    a_file = base / "a-file.txt"
    a_file.write_text("not a folder")
    inputs = {
        "make_splits": {"dataset": w["dataset"]},
        "pack_shards": {"dataset": w["dataset"], "splits": w["splits"]},
        "train_baseline": {"shards": w["shards"]},
        "sweep_thresholds": {"baseline": w["baseline"]},
        "train_gate": {"baseline": w["baseline"], "shards": w["shards"]},
        "adapt_explora": {"shards": w["shards"]},
        "export_bundle": {"baseline": w["baseline"], "policy": w["policy"], "splits": w["splits"]},
    }
    expected = {"splits": "make_splits", "shards": "pack_shards", "baseline": "train_baseline",
                "policy": "sweep_thresholds"}  # fmt: skip
    for stem, flags in inputs.items():
        extra = {"train_baseline": TINY_TRAIN, "train_gate": GATE, "adapt_explora": EXPLORA,
                 "pack_shards": PACK}.get(stem, [])  # fmt: skip
        for flag in flags:
            wrong: list[tuple[str, str]] = [(str(base / "missing"), "missing"), (str(a_file), "a-file.txt"),
                                           ("s3://", "s3 URI without a bucket")]  # fmt: skip
            if flag == "dataset":
                wrong += [(w["splits"], "labels.csv"), (w["baseline"], "labels.csv")]
            else:
                wrong += [(w["dataset"], "no manifest.json")]
                wrong += [
                    (w[k], "commit")
                    for k in ("splits", "shards", "baseline", "policy", "bundle", "gate", "explora")
                    if STEP_OF[k] != expected[flag]
                ]
            for value, expect in wrong:
                argv = [
                    stem.replace("_", "-"),
                    *[x for f, v in flags.items() for x in (f"--{f}", value if f == flag else v)],
                ]
                cases.append(
                    (
                        f"{stem}:--{flag}={Path(value).name or value}",
                        [*argv, "--out", "{out}", *extra],
                        expect,
                    )
                )
        # Output folders that must be refused before any work.
        argv = [stem.replace("_", "-"), *[x for f, v in flags.items() for x in (f"--{f}", v)], *extra]
        outs = [(str(a_file), "is a file"), (str(a_file / "sub"), "a-file.txt"),
                (str(Path(w["splits"]) / "inside"), "inside"), (str(base), "not empty")]  # fmt: skip
        outs += [(v, "input") for v in flags.values()]
        outs += [(str(Path(v).parent), "input") for v in flags.values()]
        outs += [(uri, "not an s3:// URI") for uri in ("s3:/bucket/x", "S3://bucket/x", "gs://bucket/x")]
        outs += [
            (w[k], "commit")
            for k in ("splits", "baseline", "policy", "bundle", "gate", "explora")
            if STEP_OF[k] != stem and w[k] not in flags.values()
        ]
        for value, expect in outs:
            cases.append((f"{stem}:--out={value}", [*argv, "--out", value], expect))
        cases.append(
            (
                f"{stem}:--config missing",
                [*argv, "--out", "{out}", "--config", str(base / "nope.yaml")],
                "nope.yaml",
            )
        )
        cases.append(
            (f"{stem}:--config s3", [*argv, "--out", "{out}", "--config", "s3://b/c.yaml"], "s3://b/c.yaml")
        )
        broken = base / "broken.yaml"
        broken.write_text("a: [\n")
        listed = base / "list.yaml"
        listed.write_text("- 1\n- 2\n")
        cases.append(
            (f"{stem}:--config broken", [*argv, "--out", "{out}", "--config", str(broken)], "config")
        )
        cases.append(
            (f"{stem}:--config list", [*argv, "--out", "{out}", "--config", str(listed)], "list.yaml")
        )
        unwritable = json.dumps({"outputs": {"outputFile": str(a_file / "kfp" / "output_metadata.json")}})
        for ei in ("{", '{"outputs": {}}', "[]", unwritable):
            cases.append(
                (
                    f"{stem}:--executor-input {ei}",
                    [*argv, "--out", "{out}", "--executor-input", ei],
                    "executor-input",
                )
            )

    # Checkpoints and run ids that would write into a commit, the dataset, the output or outside the root.
    train = [*step_argv["train_baseline"], "--out", "{out}"]
    cases += [
        ("train:checkpoint in the shards", [*train, f"trainer.checkpoint_uri={w['shards']}"], "trainer.checkpoint_uri"),
        ("train:checkpoint under the shards", [*train, f"trainer.checkpoint_uri={w['shards']}/ck"], "trainer.checkpoint_uri"),
        ("train:checkpoint in its output", [*train, "trainer.checkpoint_uri={out}/ck"], "trainer.checkpoint_uri"),
        ("train:checkpoint holding an input", [*train, f"trainer.checkpoint_uri={Path(w['shards']).parent}"],
         "trainer.checkpoint_uri"),
        ("train:run id ../splits", [*train, "--run-id", "../s", "--checkpoint-root", str(base / "ck")], "--run-id"),
        ("train:run id absolute", [*train, "--run-id", "/abs", "--checkpoint-root", str(base / "ck")], "--run-id"),
        ("train:run id a URI", [*train, "--run-id", "s3://b/x"], "--run-id"),
        ("explora:checkpoint in the shards", [*step_argv["adapt_explora"], "--out", "{out}",
         f"trainer.checkpoint_uri={w['shards']}"], "trainer.checkpoint_uri"),
    ]  # fmt: skip

    # Inputs that do not belong together.
    cases += [
        ("pack:splits of another dataset", ["pack-shards", "--dataset", w["dataset"], "--splits", w["other_splits"],
         "--out", "{out}", *PACK], "were made from a dataset index"),
        ("pack:dataset of other splits", ["pack-shards", "--dataset", w["other_data"], "--splits", w["splits"],
         "--out", "{out}", *PACK], "were made from a dataset index"),
        ("export:policy of another model", ["export-bundle", "--baseline", w["baseline"], "--policy", w["other_policy"],
         "--splits", w["splits"], "--out", "{out}"], "do not belong together"),
        ("export:splits of another run", ["export-bundle", "--baseline", w["baseline"], "--policy", w["policy"],
         "--splits", w["other_splits"], "--out", "{out}"], "do not belong together"),
        ("gate:shards of another dataset", ["train-gate", "--baseline", w["baseline"], "--shards", w["other_shards"],
         "--out", "{out}", *GATE], "do not belong together"),
        ("gate:baseline of other shards", ["train-gate", "--baseline", w["other_baseline"], "--shards", w["shards"],
         "--out", "{out}", *GATE], "do not belong together"),
        ("scrc:gate of another baseline", ["calibrate-scrc", "--baseline", w["other_baseline"], "--gate", w["gate"],
         "--out", "{out}", "scrc.confidence=gate"], "do not belong together"),
        ("scrc:gate without its setting", ["calibrate-scrc", "--baseline", w["baseline"], "--gate", w["gate"],
         "--out", "{out}"], "scrc.confidence=gate"),
        ("scrc:the setting without a gate", ["calibrate-scrc", "--baseline", w["baseline"], "--out", "{out}",
         "scrc.confidence=gate"], "--gate"),
        ("scrc:a baseline as gate", ["calibrate-scrc", "--baseline", w["baseline"], "--gate", w["baseline"],
         "--out", "{out}", "scrc.confidence=gate"], "train_gate"),
        ("explora:a pack as splits", ["adapt-explora", "--shards", w["splits"], "--out", "{out}", *EXPLORA],
         "pack_shards"),
        ("explora:not a ViT", ["adapt-explora", "--shards", w["shards"], "--out", "{out}",
         *EXPLORA, "model.backbone=test_efficientnet"], "ExPLoRA adapts timm ViTs"),
        ("explora:crops off the patch grid", ["adapt-explora", "--shards", w["shards"],
         "--out", "{out}", *EXPLORA, "data.image_size=40"], "multiple of the patch size"),
        ("explora:extra images missing", ["adapt-explora", "--shards", w["shards"],
         "--out", "{out}", *EXPLORA, f"explora.extra_images={base / 'missing'}"], "explora.extra_images"),
        ("train:explora of another backbone", ["train-baseline", "--shards", w["shards"],
         "--explora", w["explora"], "--out", "{out}", *TINY_TRAIN], "adapted test_vit"),
        ("train:explora of other shards", ["train-baseline", "--shards", w["other_shards"],
         "--explora", w["explora"], "--out", "{out}", *ON_EXPLORA], "do not belong together"),
        ("train:a gate as explora", ["train-baseline", "--shards", w["shards"],
         "--explora", w["gate"], "--out", "{out}", *ON_EXPLORA], "adapt_explora"),
    ]  # fmt: skip
    # Commits whose manifest agrees with its files, but whose documents are malformed.
    from streetvision.io.manifests import input_record

    policy = StepOutputs(base / "malformed_policy", "sweep_thresholds")
    policy.write_bytes("thresholds.json", b'{"policy_type": "threshold", ')
    policy.commit(config={}, inputs={"baseline": input_record(world["baseline"])})
    bundle = base / "malformed_bundle"
    shutil.copytree(world["bundle"], bundle)
    (bundle / "bundle.json").write_text("[1, 2")
    reseal(bundle)
    baseline = base / "malformed_baseline"
    shutil.copytree(world["baseline"], baseline)
    (baseline / "logits_val_calib.npy").write_bytes(b"not an array")
    reseal(baseline)
    # bundle.json re-sealed with values that its own checks must refuse before any model is built.
    resealed = {
        "another backbone": lambda b: b | {"backbone": "test_vit"},
        "huge input_size": lambda b: b | {"preprocessing": {**b["preprocessing"], "input_size": [3, 10**6, 10**6]}},
        "2-value mean": lambda b: b | {"preprocessing": {**b["preprocessing"], "mean": [0.5, 0.5]}},
        "unknown field": lambda b: b | {"signed_by": "nobody"},
        "deep nesting": lambda b: b | {"held_out": "NESTED"},
        "a NaN threshold": lambda b: b | {"policy": {**b["policy"], "params": {**b["policy"]["params"], "threshold": "NAN"}}},
    }  # fmt: skip
    for name, edit in resealed.items():
        edited = base / f"resealed-{name.replace(' ', '-')}"
        shutil.copytree(world["bundle"], edited)
        doc = json.dumps(edit(json.loads((edited / "bundle.json").read_text())))
        doc = doc.replace('"NESTED"', "[" * 5000 + "]" * 5000).replace('"NAN"', "NaN")
        (edited / "bundle.json").write_text(doc)
        reseal(edited)
        cases += [
            (f"predict:resealed bundle.json {name}", ["predict", "--bundle", edited, w["image"]], "bundle.json"),
            (f"export-hf:resealed bundle.json {name}", ["export-hf", "--bundle", edited, "--out", "{out}",
             "--submitted-by", "5F3sa2TJAWMqDhXG6jhV4N8ko9SxwGy8TpaNS1repo5EYjQX"], "bundle.json"),
        ]  # fmt: skip
    cases += [
        ("export:malformed thresholds.json", ["export-bundle", "--baseline", w["baseline"], "--policy", policy.final,
         "--splits", w["splits"], "--out", "{out}"], "thresholds.json"),
        ("predict:malformed bundle.json", ["predict", "--bundle", bundle, w["image"]], "bundle.json"),
        ("verify:malformed bundle.json", ["verify", bundle], "bundle.json"),
        ("sweep:malformed logits", ["sweep-thresholds", "--baseline", baseline, "--out", "{out}"], "val_calib"),
    ]  # fmt: skip
    for name, dataset, expect in _bad_datasets(world, base):
        if name not in IMAGE_CONTENT:  # make_splits reads ids and labels only
            cases.append(
                (
                    f"make_splits:dataset {name}",
                    ["make-splits", "--dataset", dataset, "--out", "{out}"],
                    expect,
                )
            )
        cases.append((f"pack:dataset {name}", ["pack-shards", "--dataset", dataset, "--splits", w["splits"],
                                               "--out", "{out}", *PACK], expect))  # fmt: skip

    # verify, predict, demo-data, and usage errors.
    empty = base / "empty-folder"
    empty.mkdir()
    bomb = base / "bomb.jpg"
    bomb.write_bytes(_bomb_jpeg(world["image"]))
    huge_int = base / "huge-int.yaml"
    huge_int.write_text(f"splits:\n  seed: {'9' * 5001}\n")
    cases += [
        ("verify:missing", ["verify", base / "missing"], "missing"),
        ("verify:dataset", ["verify", w["dataset"]], "no manifest.json"),
        ("verify:s3 no bucket", ["verify", "s3://"], "s3 URI without a bucket"),
        ("verify:s3 empty bucket", ["verify", "s3:///x"], "s3 URI without a bucket"),
        ("verify:S3 scheme", ["verify", "S3://b/x"], "not an s3:// URI"),
        ("predict:s3:/ bundle", ["predict", "--bundle", "s3:/b/bundle", w["image"]], "not an s3:// URI"),
        (
            "splits:S3 dataset",
            ["make-splits", "--dataset", "S3://b/data", "--out", "{out}"],
            "not an s3:// URI",
        ),
        (
            "train:s3:/ checkpoint root",
            [
                *step_commands(world)["train_baseline"],
                "--out",
                "{out}",
                "--run-id",
                "r",
                "--checkpoint-root",
                "s3:/b/ckpt",
            ],
            "not an s3:// URI",
        ),
        ("run:gs dataset", ["run", "--out", "{out}", "--dataset", "gs://b/data"], "not an s3:// URI"),
        ("predict:empty folder", ["predict", "--bundle", w["bundle"], empty], "no images"),
        ("predict:s3 image", ["predict", "--bundle", w["bundle"], "s3://b/x.jpg"], "s3://b/x.jpg"),
        ("predict:no bundle", ["predict", "--bundle", base / "missing", w["image"]], "missing"),
        ("predict:baseline as bundle", ["predict", "--bundle", w["baseline"], w["image"]], "export_bundle"),
        ("predict:dataset as bundle", ["predict", "--bundle", w["dataset"], w["image"]], "no manifest.json"),
        ("predict:bomb", ["predict", "--bundle", w["bundle"], bomb], "could not be read"),
        ("predict:no images", ["predict", "--bundle", w["bundle"]], "required"),
        ("demo-data:n=4", ["demo-data", "--out", "{out}", "--n", "4"], "8 to 1,000,000 images"),
        ("demo-data:n=0", ["demo-data", "--out", "{out}", "--n", "0"], "8 to 1,000,000 images"),
        ("demo-data:n=10^20", ["demo-data", "--out", "{out}", "--n", "9" * 20], "8 to 1,000,000 images"),
        ("run:demo.n=10^20", ["run", "--out", "{out}", "demo.n=" + "9" * 20], "demo.n"),
        (
            "splits:a 5,001-digit integer in --config",
            ["make-splits", "--dataset", w["dataset"], "--out", "{out}", "--config", huge_int],
            "huge-int.yaml",
        ),
        ("demo-data:size=0", ["demo-data", "--out", "{out}", "--size", "0"], "size"),
        ("demo-data:seed=-1", ["demo-data", "--out", "{out}", "--seed", "-1"], "seed"),
        ("demo-data:n=abc", ["demo-data", "--out", "{out}", "--n", "abc"], "invalid int"),
        ("demo-data:out file", ["demo-data", "--out", a_file], "is a file"),
        ("demo-data:s3 no bucket", ["demo-data", "--out", "s3://"], "s3 URI without a bucket"),
        ("usage:unknown command", ["bogus"], "invalid choice"),
        ("usage:no command", [], "required"),
        (
            "usage:unknown flag",
            ["make-splits", "--dataset", w["dataset"], "--out", "{out}", "--bogus"],
            "--bogus",
        ),
        ("usage:missing --out", ["make-splits", "--dataset", w["dataset"]], "--out"),
    ]
    return cases


def _bomb_jpeg(image: Path) -> bytes:
    """A real JPEG whose header claims 60000x60000 pixels."""
    data = bytearray(image.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    return bytes(data)


def test_bad_input_matrix_gets_one_line_commits_nothing_and_keeps_every_commit(world, tmp_path, capsys):
    failures_log = Path(os.environ.get("SV_FAULTS_LOG", os.devnull))
    before = fingerprint(world)
    cases = bad_inputs(world, tmp_path)
    failures = []
    for i, (case, argv, expect) in enumerate(cases):
        out = tmp_path / "outs" / str(i)
        code, _, err = run_cli(capsys, [str(a).replace("{out}", str(out)) for a in argv])
        ok = code != 0 and one_line(err) and expect in err and not (out / MANIFEST).exists()
        if not ok:
            failures.append(f"{case}: exit {code}, stderr {err!r} (expected to name {expect!r})")
    failures_log.write_text("\n".join(failures))
    assert fingerprint(world) == before, "a bad input changed an existing commit"
    with capsys.disabled():
        print(f"\nbad-input matrix: {len(cases) - len(failures)}/{len(cases)} cases held")
    assert len(cases) >= 300 and not failures, "\n".join(failures[:20])


# ---------------------------------------------------------------------------------------------------------
# Tampering


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))


def _edit_manifest(d: Path, edit, *, seal: bool) -> None:
    from streetvision.io.manifests import Manifest

    data = json.loads((d / MANIFEST).read_text())
    edit(data)
    if seal:
        data = Manifest(**data).sealed().to_dict()
    (d / MANIFEST).write_text(json.dumps(data))


def tampers(main_file: str) -> dict[str, tuple]:
    """name -> (edit(dir, outside), what the error names)."""

    def symlink_in(d, outside):
        (outside / main_file).parent.mkdir(parents=True, exist_ok=True)  # train/index.json: a nested name
        shutil.copy(d / main_file, outside / main_file)
        (d / main_file).unlink()
        (d / main_file).symlink_to(outside / main_file)

    def manifest_link(d, outside):
        shutil.move(d / MANIFEST, outside / MANIFEST)
        (d / MANIFEST).symlink_to(outside / MANIFEST)

    return {
        "flip": (lambda d, o: _flip(d / main_file), main_file),
        "flip-config": (lambda d, o: (d / "config.yaml").write_text((d / "config.yaml").read_text() + "#\n"), "config.yaml"),
        "truncate": (lambda d, o: (d / main_file).write_bytes((d / main_file).read_bytes()[:-1]), main_file),
        "delete": (lambda d, o: (d / main_file).unlink(), main_file),
        "extra-file": (lambda d, o: (d / "extra.txt").write_text("x"), "extra.txt"),
        "hidden-file": (lambda d, o: (d / ".evil").write_text("x"), ".evil"),
        "empty-folder": (lambda d, o: (d / "empty").mkdir(), "empty"),
        "symlink-in": (symlink_in, main_file),
        "symlink-out": (lambda d, o: (d / "link").symlink_to("/etc/hostname"), "link"),
        "manifest-deleted": (lambda d, o: (d / MANIFEST).unlink(), MANIFEST),
        "manifest-symlink": (manifest_link, MANIFEST),
        "manifest-truncated": (lambda d, o: (d / MANIFEST).write_text((d / MANIFEST).read_text()[:50]), MANIFEST),
        "manifest-not-json": (lambda d, o: (d / MANIFEST).write_text("{"), MANIFEST),
        "manifest-not-object": (lambda d, o: (d / MANIFEST).write_text("[]"), MANIFEST),
        "manifest-absolute-path": (lambda d, o: _edit_manifest(
            d, lambda m: m["outputs"].__setitem__("/etc/passwd", {"sha256": "0" * 64, "size": 1}), seal=True), "/etc/passwd"),
        "manifest-dotdot-path": (lambda d, o: _edit_manifest(
            d, lambda m: m["outputs"].__setitem__("../x", {"sha256": "0" * 64, "size": 1}), seal=True), "../x"),
        "manifest-metric-edited": (lambda d, o: _edit_manifest(
            d, lambda m: m["metrics"].__setitem__("mcc", 0.99), seal=False), MANIFEST),
        "manifest-config-hash-edited": (lambda d, o: _edit_manifest(
            d, lambda m: m.__setitem__("config_sha256", "0" * 64), seal=True), MANIFEST),
        "manifest-config-edited": (lambda d, o: _edit_manifest(
            d, lambda m: m["config"].__setitem__("seed", 123), seal=False), MANIFEST),
        "manifest-step-renamed": (lambda d, o: _edit_manifest(
            d, lambda m: m.__setitem__("step", "other_step"), seal=True), "other_step"),
        "manifest-hash-edited": (lambda d, o: _edit_manifest(
            d, lambda m: m["outputs"][main_file].__setitem__("sha256", "0" * 64), seal=True), main_file),
        "manifest-schema": (lambda d, o: _edit_manifest(
            d, lambda m: m.__setitem__("schema_version", 1), seal=False), MANIFEST),
    }  # fmt: skip


def loaders(world, which: str, tampered: Path, out: Path) -> list[list]:
    """Every command that reads a commit of kind ``which``, pointed at the tampered copy."""
    w = {k: str(v) for k, v in world.items()}
    t = str(tampered)
    if which == "splits":
        return [["pack-shards", "--dataset", w["dataset"], "--splits", t, "--out", out, *PACK],
                ["export-bundle", "--baseline", w["baseline"], "--policy", w["policy"], "--splits", t, "--out", out]]  # fmt: skip
    if which == "shards":
        return [["train-baseline", "--shards", t, "--out", out, *TINY_TRAIN],
                ["train-gate", "--baseline", w["baseline"], "--shards", t, "--out", out, *GATE]]  # fmt: skip
    if which == "baseline":
        return [["sweep-thresholds", "--baseline", t, "--out", out],
                ["export-bundle", "--baseline", t, "--policy", w["policy"], "--splits", w["splits"], "--out", out]]  # fmt: skip
    if which == "policy":
        return [
            [
                "export-bundle",
                "--baseline",
                w["baseline"],
                "--policy",
                t,
                "--splits",
                w["splits"],
                "--out",
                out,
            ]
        ]
    if which == "gate":
        return [
            ["calibrate-scrc", "--baseline", w["baseline"], "--gate", t, "--out", out, "scrc.confidence=gate"]
        ]
    if which == "explora":
        return [["train-baseline", "--shards", w["shards"], "--explora", t, "--out", out, *ON_EXPLORA]]
    return [["predict", "--bundle", t, w["image"]]]


MAIN_FILES = {
    "splits": ["splits.json"],
    "shards": ["samples.json", "train/index.json"],
    "baseline": ["model.safetensors", "logits_val_calib.npy"],
    "policy": ["thresholds.json"],
    "bundle": ["bundle.json", "model.safetensors"],
    "gate": ["gate_val_calib_challenge.npy"],
    "explora": ["backbone.safetensors"],
}


def test_tamper_matrix_is_refused_by_verify_and_every_loader_naming_the_file(world, tmp_path, capsys):
    cases = checks = 0
    failures = []
    for which, files in MAIN_FILES.items():
        for main_file in files:
            for name, (edit, expect) in tampers(main_file).items():
                if main_file != files[0] and not name.startswith(
                    ("flip", "truncate", "delete", "symlink-in", "manifest-hash")
                ):
                    continue
                case = tmp_path / f"{which}-{main_file}-{name}"
                outside = case / "outside"
                outside.mkdir(parents=True)
                tampered = case / STEP_OF[which]
                shutil.copytree(world[which], tampered, symlinks=True)
                edit(tampered, outside)
                cases += 1
                for argv in [["verify", tampered], *loaders(world, which, tampered, case / "out")]:
                    checks += 1
                    code, _, err = run_cli(capsys, argv)
                    if not (
                        code != 0
                        and one_line(err)
                        and expect in err
                        and not (case / "out" / MANIFEST).exists()
                    ):
                        failures.append(f"{which}/{main_file}/{name} via {argv[0]}: exit {code}, {err!r}")
    with capsys.disabled():
        print(f"\ntamper matrix: {cases} tampered commits, {checks - len(failures)}/{checks} refusals held")
    assert not failures, "\n".join(failures[:20])


def test_an_edited_threshold_in_bundle_json_is_never_served(world, tmp_path, capsys):
    bundle = tmp_path / "export_bundle"
    shutil.copytree(world["bundle"], bundle)
    data = json.loads((bundle / "bundle.json").read_text())
    data["policy"]["params"]["threshold"] = 0.999
    (bundle / "bundle.json").write_text(json.dumps(data))
    code, out, err = run_cli(capsys, ["predict", "--bundle", bundle, world["image"]])
    assert code == 2 and out == "" and "bundle.json: size" in err
    reseal(bundle)  # even a manifest re-signed to match: the policy file still disagrees
    code, out, err = run_cli(capsys, ["predict", "--bundle", bundle, world["image"]])
    assert code == 2 and out == "" and "differs from the one in thresholds.json" in err


def test_a_bundle_without_its_manifest_does_not_verify(world, tmp_path, capsys):
    bundle = tmp_path / "export_bundle"
    shutil.copytree(world["bundle"], bundle)
    (bundle / MANIFEST).unlink()  # what a kill right after bundle.json leaves
    for argv in (["verify", bundle], ["predict", "--bundle", bundle, world["image"]]):
        code, _, err = run_cli(capsys, argv)
        assert code == 2 and "no manifest.json" in err


def test_overlapping_splits_and_splits_committed_as_another_step_are_refused(world, tmp_path, capsys):
    from streetvision.data.dataset import dataset_input, load_index

    parts = json.loads((world["splits"] / "splits.json").read_text())
    parts["val_test"] = [*parts["val_test"], parts["train"][0]]
    for step, expect in (
        ("make_splits", "must not overlap"),
        ("train_baseline", "'make_splits' commit is expected"),
    ):
        out = StepOutputs(tmp_path / step, step)
        out.write_json("splits.json", parts)
        out.commit(config={}, inputs={"dataset": dataset_input(load_index(world["dataset"]))})
        code, _, err = run_cli(capsys, ["pack-shards", "--dataset", world["dataset"], "--splits", tmp_path / step,
                                        "--out", tmp_path / "p1", *PACK])  # fmt: skip
        assert code == 2 and one_line(err) and expect in err, err


def test_credentials_inside_a_uri_are_never_echoed(world, tmp_path, capsys):
    code, _, err = run_cli(capsys, ["make-splits", "--dataset", "s3://AKIAEXAMPLE:hunter2@bucket/data",
                                    "--out", tmp_path / "o"])  # fmt: skip
    assert code == 2 and "hunter2" not in err and "AKIAEXAMPLE" not in err
    out = StepOutputs(tmp_path / "m", "make_splits")
    manifest = out.commit(config={"model": {"weights": "https://user:hunter2@host/w.safetensors"}})
    assert (
        "hunter2" not in json.dumps(manifest.to_dict()) and "***@host" in manifest.config["model"]["weights"]
    )
    # The config.yaml beside a step's outputs is the manifest's config: masked the same way.
    from streetvision.config import load_config
    from streetvision.steps import commit, train_baseline

    config = load_config(train_baseline.Config, [], ["model.weights=https://user:hunter2@host/w.safetensors"])
    with StepOutputs(tmp_path / "t", "train_baseline") as outputs:
        commit(outputs, config, {}, {}, run_id=None, task="")
    text = (tmp_path / "t" / "config.yaml").read_text()
    assert "hunter2" not in text and "https://***@host/w.safetensors" in text


# ---------------------------------------------------------------------------------------------------------
# Kills, concurrency, a dying object store


def _big_png(path: Path, side: int) -> Path:
    """A real PNG whose header says ``side`` x ``side`` pixels (its CRC recomputed): opening it is cheap,
    decoding it in full would not be."""
    import zlib

    from PIL import Image

    Image.new("RGB", (8, 8), (200, 120, 0)).save(path, "PNG")
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = side.to_bytes(4, "big") * 2
    data[ihdr + 17 : ihdr + 21] = zlib.crc32(bytes(data[ihdr : ihdr + 17])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


def test_an_image_bomb_gets_its_own_error_line_while_the_batch_goes_on(world, tmp_path, capsys):
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(_bomb_jpeg(world["image"]))
    png = _big_png(tmp_path / "big.png", 12000)  # 144 megapixels, under PIL's own bomb limit
    code, out, err = run_cli(capsys, ["predict", "--bundle", world["bundle"], bomb, png, world["image"]])
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 1 and one_line(err) and "2 image(s) could not be read" in err
    assert "error" in rows[0] and "DecompressionBomb" in rows[0]["error"]
    assert "error" in rows[1] and "12000x12000 pixels to decode" in rows[1]["error"]
    assert rows[2]["id"] == str(world["image"]) and rows[2]["decision"] in ("roadwork", "no_roadwork")


def test_every_step_saves_its_resolved_config_beside_its_outputs(world):
    for kind, step in STEP_OF.items():
        assert "config.yaml" in verify_dir(world[kind], step).outputs, kind
