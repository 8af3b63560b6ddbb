"""Metrics agree with scikit-learn, the oracle, on random and degenerate inputs."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from streetvision.eval.metrics import compute_all_metrics, compute_mcc

labels = st.lists(st.integers(0, 1), min_size=1, max_size=60)


def sklearn_metrics(t, p):
    tn, fp, fn, tp = skm.confusion_matrix(t, p, labels=[0, 1]).ravel()
    return {
        "mcc": skm.matthews_corrcoef(t, p),
        "accuracy": skm.accuracy_score(t, p),
        "precision": skm.precision_score(t, p, zero_division=0),
        "recall": skm.recall_score(t, p, zero_division=0),
        "f1": skm.f1_score(t, p, zero_division=0),
        "fnr": fn / (fn + tp) if fn + tp else 0.0,
        "fpr": fp / (fp + tn) if fp + tn else 0.0,
        "tp": tp,
        "tn": tn,
        "fp": fp,
        "fn": fn,
    }


def assert_same(ours, oracle):
    assert set(ours) == set(oracle)
    for k, v in oracle.items():
        assert ours[k] == pytest.approx(float(v), abs=1e-12), k


@settings(max_examples=300, deadline=None)
@given(data=st.data(), t=labels)
def test_all_metrics_match_sklearn_on_random_labels(data, t):
    p = data.draw(st.lists(st.integers(0, 1), min_size=len(t), max_size=len(t)))
    assert_same(compute_all_metrics(t, p), sklearn_metrics(t, p))


@pytest.mark.parametrize(
    "t,p",
    [
        ([1, 1, 1], [1, 1, 1]),  # one class, all right
        ([0, 0, 0], [1, 1, 1]),  # one class, all wrong
        ([0, 1, 0, 1], [0, 0, 0, 0]),  # predictor never says positive
        ([0, 1, 0, 1], [1, 1, 1, 1]),  # predictor always says positive
        ([1], [0]),
    ],
)
def test_degenerate_cases_follow_sklearn(t, p):
    assert_same(compute_all_metrics(t, p), sklearn_metrics(t, p))


def test_empty_input_gives_zero_counts_and_rates():
    m = compute_all_metrics([], [])
    assert m["tp"] == m["tn"] == m["fp"] == m["fn"] == 0
    assert m["mcc"] == m["accuracy"] == 0.0


def test_large_counts_do_not_overflow_the_mcc_denominator():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 2, 3_000_000)
    p = np.where(rng.random(t.size) < 0.9, t, 1 - t)
    assert compute_mcc(t, p) == pytest.approx(skm.matthews_corrcoef(t, p), abs=1e-12)


def test_accepts_numpy_torch_bool_and_column_inputs():
    torch = pytest.importorskip("torch")
    t = [0, 1, 1, 0, 1]
    p = [0, 1, 0, 0, 1]
    ref = compute_all_metrics(t, p)
    assert compute_all_metrics(np.array(t), np.array(p)) == ref
    assert compute_all_metrics(torch.tensor(t), torch.tensor(p)) == ref
    assert compute_all_metrics(np.array(t, bool), np.array(p, bool)) == ref
    assert compute_all_metrics(np.array(t)[:, None], np.array(p)[:, None]) == ref


@pytest.mark.parametrize(
    "t,p,msg",
    [
        ([0, 2], [0, 1], "only 0 and 1"),
        ([0, 1], [0], "differ in length"),
        ([[0, 1], [1, 0]], [[0, 1], [1, 0]], "one-dim"),
    ],
)
def test_bad_inputs_are_rejected(t, p, msg):
    with pytest.raises(ValueError, match=msg):
        compute_all_metrics(t, p)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), t=labels)
def test_auroc_matches_sklearn_with_ties_and_one_class(data, t):
    from streetvision.eval.metrics import auroc

    # Scores on a coarse grid, so that ties within and across the classes are common.
    s = data.draw(st.lists(st.integers(0, 6), min_size=len(t), max_size=len(t)))
    scores = np.array(s, dtype=float) / 6
    if len(set(t)) < 2:
        assert auroc(scores, t) == 0.5
    else:
        assert auroc(scores, t) == pytest.approx(skm.roc_auc_score(t, scores), abs=1e-12)
