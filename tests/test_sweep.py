"""sweep_thresholds: exact sweep, max-MCC policy, selective prediction, report and KFP executor output."""

import json
import subprocess
import sys

import numpy as np
import pytest
from baseline_fake import fake_baseline, separable_logits
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from streetvision.config import load_config
from streetvision.eval import sweep
from streetvision.eval.metrics import compute_all_metrics
from streetvision.io.manifests import MANIFEST, verify_dir
from streetvision.steps import sweep_thresholds


def scores_and_labels():
    # Few distinct values force ties; both classes always present.
    return st.integers(2, 40).flatmap(
        lambda n: st.tuples(
            st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5001, 0.75, 0.9, 1.0]), min_size=n, max_size=n),
            st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda v: 0 < sum(v) < len(v)),
        )
    )


@settings(max_examples=300, deadline=None)
@given(scores_and_labels())
def test_exact_sweep_equals_brute_force_with_ties(data):
    scores, labels = np.array(data[0]), np.array(data[1])
    s = sweep.exact_sweep(scores, labels)
    assert s.thresholds.tolist() == sorted(set(scores.tolist()), reverse=True)
    for k, t in enumerate(s.thresholds):
        m = compute_all_metrics(labels, (scores >= t).astype(int))
        assert (s.tp[k], s.fp[k], s.tn[k], s.fn[k]) == (m["tp"], m["fp"], m["tn"], m["fn"])


@settings(max_examples=200, deadline=None)
@given(scores_and_labels())
def test_exact_sweep_matches_sklearn_confusion_matrix_at_thresholds(data):
    scores, labels = np.array(data[0]), np.array(data[1])
    tns, fps, fns, tps, thresholds = skm.confusion_matrix_at_thresholds(labels, scores)
    s = sweep.exact_sweep(scores, labels)
    assert s.thresholds.tolist() == thresholds.tolist()
    assert (s.tp.tolist(), s.fp.tolist(), s.tn.tolist(), s.fn.tolist()) == (
        tps.tolist(),
        fps.tolist(),
        tns.tolist(),
        fns.tolist(),
    )


@pytest.mark.parametrize("seed", range(25))
def test_max_mcc_threshold_and_metrics_agree_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 300))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = np.round(np.clip(labels * 0.3 + rng.random(n) * 0.7, 0, 1), int(rng.integers(1, 4)))
    threshold, _ = sweep.choose_threshold(sweep.exact_sweep(scores, labels))
    best = max(skm.matthews_corrcoef(labels, scores >= t) for t in np.unique(scores))
    assert skm.matthews_corrcoef(labels, scores >= threshold) == pytest.approx(best, abs=1e-12)
    assert threshold not in set(scores.tolist())  # the midpoint, not a calibration score
    ours = sweep.metrics_at(scores, labels, threshold)
    assert ours["f1"] == pytest.approx(skm.f1_score(labels, scores >= threshold), abs=1e-12)


def test_mcc_ties_go_to_the_lower_threshold():
    scores = np.array([0.1, 0.2, 0.8, 0.9])
    labels = np.array([0, 1, 0, 1])  # MCC is 0 at 0.9... check the documented rule on a flat tie
    s = sweep.exact_sweep(scores, labels)
    mcc = s.metrics()["mcc"]
    _, k = sweep.choose_threshold(s)
    assert k == int(np.flatnonzero(mcc == mcc.max())[-1])


def test_constraint_is_honoured_or_fails_clearly():
    logits, labels = separable_logits(400, seed=1)
    scores = sweep.probabilities(logits)
    s = sweep.exact_sweep(scores, labels)
    t, _ = sweep.choose_threshold(s, sweep.Constraint(max_fnr=0.02))
    assert sweep.metrics_at(scores, labels, t)["fnr"] <= 0.02
    with pytest.raises(sweep.SweepError, match="max_fnr=0.0 .*max_fpr=0.0"):
        sweep.choose_threshold(s, sweep.Constraint(max_fnr=0.0, max_fpr=0.0))


def test_aurc_equals_the_direct_computation_and_e_aurc_is_zero_for_a_perfect_ranking():
    rng = np.random.default_rng(3)
    conf = rng.permutation(np.linspace(0.5, 1.0, 200))  # distinct confidences
    correct = rng.random(200) < 0.8
    rc = sweep.risk_coverage(conf, correct)
    order = np.argsort(-conf)
    direct = np.mean([1 - correct[order[:k]].mean() for k in range(1, 201)])
    assert rc.aurc == pytest.approx(direct, abs=1e-12)
    perfect = sweep.risk_coverage(np.where(correct, 1.0, 0.6) + rng.random(200) * 1e-3, correct)
    assert perfect.e_aurc == pytest.approx(0.0, abs=1e-12)
    assert rc.e_aurc > 0.01


def test_two_logit_columns_use_softmax_class_one():
    two = np.array([[0.0, 2.0], [1.0, -1.0]])
    assert sweep.probabilities(two) == pytest.approx(1 / (1 + np.exp(-(two[:, 1] - two[:, 0]))))


def run_step(tmp_path, baseline, *overrides):
    cfg = load_config(sweep_thresholds.Config, [], list(overrides))
    return sweep_thresholds.run(cfg, baseline=baseline, out=tmp_path / "sweep")


def test_step_on_synthetic_logits_commits_policy_report_and_plots(tmp_path):
    logits, labels = separable_logits()
    m = run_step(tmp_path, fake_baseline(tmp_path / "p1", logits, labels))
    out = tmp_path / "sweep"
    verify_dir(out)
    assert {
        "thresholds.json",
        "sweep.csv",
        "risk_coverage.csv",
        "report.md",
        "mcc_vs_threshold.png",
        "risk_coverage.png",
        "roc.json",
        "selective_table.json",
    } <= set(m.outputs)
    policy = json.loads((out / "thresholds.json").read_text())
    assert policy["policy_type"] == "threshold" and policy["split"] == "val_calib" and policy["n"] == 400
    assert policy["metrics"]["mcc"] == pytest.approx(
        skm.matthews_corrcoef(labels, sweep.probabilities(logits) >= policy["threshold"])
    )
    assert (out / "mcc_vs_threshold.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mcc_vs_threshold.png" in (out / "report.md").read_text()
    assert m.inputs["baseline"]["manifest_sha256"]
    table = json.loads((out / "selective_table.json").read_text())
    assert [r["threshold"] for r in table][:2] == [0.5, 0.55] and table[0]["coverage"] == 1.0


def cli(*args):
    return subprocess.run([sys.executable, "-m", "streetvision", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "logits,labels,message",
    [
        (np.array([[np.nan], [1.0], [0.0]]), np.array([0, 1, 1]), "NaN or infinite"),
        (np.array([[np.inf], [1.0], [0.0]]), np.array([0, 1, 1]), "NaN or infinite"),
        (np.array([[0.1], [1.0]]), np.array([1, 1]), "only class 1"),
        (np.zeros((0, 1)), np.zeros(0, dtype=int), "no rows"),
        (np.zeros((3, 1)), np.array([0, 1]), "differ in length"),
        (np.zeros((3, 3)), np.array([0, 1, 1]), "shape"),
    ],
)
def test_bad_inputs_exit_nonzero_with_one_line_and_no_manifest(tmp_path, logits, labels, message):
    p1 = fake_baseline(tmp_path / "p1", logits, labels)
    r = cli("sweep-thresholds", "--baseline", str(p1), "--out", str(tmp_path / "out"))
    assert r.returncode != 0 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_baseline_whose_manifest_does_not_verify_is_refused(tmp_path):
    logits, labels = separable_logits(50)
    p1 = fake_baseline(tmp_path / "p1", logits, labels)
    (p1 / "labels_val_calib.npy").write_bytes((p1 / "labels_val_calib.npy").read_bytes()[:-1] + b"\x01")
    r = cli("sweep-thresholds", "--baseline", str(p1), "--out", str(tmp_path / "out"))
    assert r.returncode != 0 and "labels_val_calib.npy" in r.stderr
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_unsatisfiable_constraint_fails_with_the_numbers(tmp_path):
    logits, labels = separable_logits(100, noise=2.0)
    p1 = fake_baseline(tmp_path / "p1", logits, labels)
    r = cli(
        "sweep-thresholds",
        "--baseline",
        str(p1),
        "--out",
        str(tmp_path / "out"),
        "sweep.max_fnr=0.0",
        "sweep.max_fpr=0.0",
    )
    assert r.returncode != 0 and "no threshold on val_calib satisfies" in r.stderr
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_step_never_imports_torch(tmp_path):
    logits, labels = separable_logits(100)
    p1 = fake_baseline(tmp_path / "p1", logits, labels)
    code = (
        "import sys; from streetvision.cli import main;"
        f"rc = main(['sweep-thresholds', '--baseline', {str(p1)!r}, '--out', {str(tmp_path / 'o')!r}]);"
        "assert 'torch' not in sys.modules, 'torch was imported'; raise SystemExit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def executor_input(tmp_path, outputs):
    return {
        "inputs": {},
        "outputs": {
            "artifacts": {
                name: {
                    "artifacts": [
                        {"name": name, "type": {"schemaTitle": schema}, "uri": str(tmp_path / name)}
                    ]
                }
                for name, schema in outputs.items()
            },
            "outputFile": str(tmp_path / "executor_output.json"),
        },
    }


def test_executor_output_validates_against_the_kfp_sdk(tmp_path):
    from google.protobuf import json_format
    from kfp import dsl
    from kfp.pipeline_spec import pipeline_spec_pb2

    logits, labels = separable_logits(300)
    p1 = fake_baseline(tmp_path / "p1", logits, labels)
    ei = executor_input(
        tmp_path,
        {
            "thresholds": "system.Artifact",
            "metrics": "system.Metrics",
            "classification": "system.ClassificationMetrics",
            "report": "system.Markdown",
        },
    )
    r = cli(
        "sweep-thresholds",
        "--baseline",
        str(p1),
        "--out",
        str(tmp_path / "thresholds"),
        "--executor-input",
        json.dumps(ei),
    )
    assert r.returncode == 0, r.stderr
    raw = json.loads((tmp_path / "executor_output.json").read_text())
    parsed = json_format.ParseDict(raw, pipeline_spec_pb2.ExecutorOutput())  # strict: unknown fields fail
    assert set(parsed.artifacts) == {"thresholds", "metrics", "classification", "report"}

    meta = raw["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert {"mcc", "accuracy", "fnr", "fpr", "threshold", "aurc"} <= set(meta)

    policy = json.loads((tmp_path / "thresholds" / "thresholds.json").read_text())
    roc = json.loads((tmp_path / "thresholds" / "roc.json").read_text())
    ref = dsl.ClassificationMetrics(name="classification")
    m = policy["metrics"]
    ref.log_confusion_matrix(["no_roadwork", "roadwork"], [[m["tn"], m["fp"]], [m["fn"], m["tp"]]])
    ref.log_roc_curve(roc["fpr"], roc["tpr"], roc["threshold"])
    assert raw["artifacts"]["classification"]["artifacts"][0]["metadata"] == ref.metadata
    assert 2 < len(ref.metadata["confidenceMetrics"]) <= 200
    assert (tmp_path / "report").read_text().startswith("# Threshold sweep")


def test_challenge_views_are_what_the_threshold_is_fitted_on(tmp_path):
    logits, labels = separable_logits(n=200, seed=3)
    p1 = fake_baseline(tmp_path / "p1", logits, labels)
    # Replace the fake's challenge views by shifted logits: two views per image, levels 0-3.
    shifted = np.repeat(logits, 2, axis=0) - 1.5
    rows = np.repeat(np.arange(len(labels)), 2)
    views = np.stack([rows, np.arange(len(rows)) % 4], axis=1)
    from streetvision.io.outputs import StepOutputs

    out = StepOutputs(tmp_path / "p1b", "train_baseline")
    for name in ("logits_val_calib.npy", "labels_val_calib.npy"):
        out.copy(name, p1 / name)
    out.write_npy("logits_val_calib_challenge.npy", shifted)
    out.write_npy("views_val_calib_challenge.npy", views)
    out.commit(config={})
    run_step(tmp_path / "c", tmp_path / "p1b")
    run_step(tmp_path / "k", tmp_path / "p1b", "sweep.views=clean")
    challenge = json.loads((tmp_path / "c" / "sweep" / "thresholds.json").read_text())
    clean = json.loads((tmp_path / "k" / "sweep" / "thresholds.json").read_text())
    expected, _ = sweep.choose_threshold(sweep.exact_sweep(sweep.probabilities(shifted), labels[rows]))
    assert challenge["threshold"] == expected and challenge["views"] == "challenge"
    assert challenge["n"] == 2 * len(labels) and challenge["images"] == len(labels)
    assert set(challenge["by_level"]) == {"level_0", "level_1", "level_2", "level_3"}
    assert clean["views"] == "clean" and clean["threshold"] != challenge["threshold"]
    assert "challenge level" in (tmp_path / "c" / "sweep" / "report.md").read_text()


def test_missing_or_malformed_challenge_views_get_one_line(tmp_path):
    logits, labels = separable_logits(n=100)
    p1 = fake_baseline(tmp_path / "p1", logits, labels, challenge=False)
    r = cli("sweep-thresholds", "--baseline", str(p1), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "eval.challenge_views" in r.stderr and len(r.stderr.splitlines()) == 1
    assert (
        cli(
            "sweep-thresholds", "--baseline", str(p1), "--out", str(tmp_path / "o2"), "sweep.views=clean"
        ).returncode
        == 0
    )
    from streetvision.io.outputs import StepOutputs

    out = StepOutputs(tmp_path / "bad", "train_baseline")
    for name in ("logits_val_calib.npy", "labels_val_calib.npy"):
        out.copy(name, p1 / name)
    out.write_npy("logits_val_calib_challenge.npy", logits)
    out.write_npy("views_val_calib_challenge.npy", np.stack([np.arange(100) + 5, np.zeros(100, int)], axis=1))
    out.commit(config={})
    r = cli("sweep-thresholds", "--baseline", str(tmp_path / "bad"), "--out", str(tmp_path / "o3"))
    assert r.returncode == 2 and "out of range" in r.stderr and len(r.stderr.splitlines()) == 1


def test_selective_confidence_is_the_margin_from_the_decision_threshold(tmp_path):
    # Scores just below a low threshold are decided "no roadwork" with little margin: not confident.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    logits = np.where(labels == 1, rng.normal(-1.0, 0.5, 400), rng.normal(-3.5, 0.5, 400))[:, None]
    run_step(tmp_path, fake_baseline(tmp_path / "p1", logits, labels))
    t = json.loads((tmp_path / "sweep" / "thresholds.json").read_text())["threshold"]
    assert t < 0.3
    table = json.loads((tmp_path / "sweep" / "selective_table.json").read_text())
    from streetvision.bundle import served_probability

    p = sweep.probabilities(logits)
    served = served_probability(p, t)
    row = next(r for r in table if r["threshold"] == 0.8)
    assert row["num_accepted"] == int((np.maximum(served, 1 - served) >= 0.8).sum())
    assert row["num_accepted"] < int((np.maximum(p, 1 - p) >= 0.8).sum())  # what |2p-1| would have accepted
