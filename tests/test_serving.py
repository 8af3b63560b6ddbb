"""Serving: the in-process predictor, the miner adapter in the subnet's registry shape, the reward."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, matthews_corrcoef

from streetvision.bundle import verify_bundle
from streetvision.data import challenge
from streetvision.errors import StreetVisionError
from streetvision.eval.metrics import subnet_reward
from streetvision.eval.sweep import probabilities


def _brute_force_reward(truth, answers):
    """The validator's tracker, step by step, with scikit-learn: the oracle for ``subnet_reward``."""
    rewards = []
    for t in range(99, len(truth)):
        y100, p100 = truth[t - 99 : t + 1], answers[t - 99 : t + 1]
        mcc = max(0, matthews_corrcoef(y100, p100)) if len(set(y100)) > 1 and len(set(p100)) > 1 else 0.0
        acc = accuracy_score(truth[t - 9 : t + 1], answers[t - 9 : t + 1])
        rewards.append((0.5 * mcc + 0.5 * acc) ** 3)
    return float(np.mean(rewards))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simulated_reward_equals_the_validators_tracker_step_by_step(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    served = np.clip(labels * 0.6 + rng.normal(0.2, 0.3, 60), 0, 1)
    served[:3] = 0.5  # np.round reads 0.5 as 0
    got = subnet_reward(labels, served, seed=seed, steps=400, repeats=1)
    # Replay the same stream: the generator's draws in the order subnet_reward makes them.
    g = np.random.default_rng(seed)
    truth = g.integers(0, 2, (1, 400))[0]
    pick = np.empty_like(truth)
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        mask = truth == c
        pick[mask] = idx[g.integers(0, idx.size, mask.sum())]
    answers = np.round(served[pick]).astype(int)
    assert got["reward"] == pytest.approx(_brute_force_reward(truth, answers), abs=1e-12)


def test_reward_orders_perfect_above_coin_flip_and_refuses_one_class():
    labels = np.array([0, 1] * 50)
    assert subnet_reward(labels, labels)["reward"] == 1.0
    assert subnet_reward(labels, np.full(100, 0.5))["reward"] < 0.05  # always "no": MCC 0
    with pytest.raises(ValueError, match="both classes"):
        subnet_reward(np.zeros(5), np.zeros(5))


@pytest.fixture(scope="module")
def bundle(trained, tmp_path_factory):
    from streetvision.config import load_config
    from streetvision.steps import export_bundle

    out = tmp_path_factory.mktemp("serving") / "export_bundle"
    export_bundle.run(
        load_config(export_bundle.Config), baseline=trained["baseline"], policy=trained["policy"],
        splits=trained["splits"], out=out,
    )  # fmt: skip
    return out


@pytest.mark.slow
def test_predictor_reproduces_the_bundles_decisions_one_image_at_a_time(bundle, trained):
    from streetvision.predict import Predictor

    predictor = Predictor.from_bundle(bundle)
    t = verify_bundle(bundle)["policy"]["params"]["threshold"]
    ids = json.loads((trained["baseline"] / "ids_val_test.json").read_text())
    p = probabilities(np.load(trained["baseline"] / "logits_val_test.npy"))
    served = np.array([predictor(Image.open(trained["dataset"] / i)) for i in ids])
    assert served.min() >= 0 and served.max() <= 1
    np.testing.assert_array_equal(np.round(served) == 1, p >= t)  # every decision, as the validator cuts


@pytest.mark.slow
def test_miner_adapter_in_the_registrys_shape(bundle, tmp_path, monkeypatch):
    from streetvision.miner import StreetVisionDetector
    from streetvision.predict import Predictor

    class Registry(dict):  # the subnet's DETECTOR_REGISTRY: register_module(name)(cls), then [name]
        def register_module(self, module_name=None):
            def add(cls):
                self[module_name or cls.__name__] = cls
                return cls

            return add

    registry = Registry()
    registry.register_module(module_name="StreetVision")(StreetVisionDetector)
    (tmp_path / "streetvision.yaml").write_text(f"bundle: {bundle}\n")
    detector = registry["StreetVision"](config_name=str(tmp_path / "streetvision.yaml"), device="cpu")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    view, _ = challenge.challenge(photo, np.random.default_rng(1))
    sent = Image.open(io.BytesIO(challenge.encode(view)))  # what neurons/miner.py hands the detector
    answer = detector(sent)
    assert isinstance(answer, float) and 0 <= answer <= 1
    assert answer == Predictor.from_bundle(bundle)(sent)
    monkeypatch.setenv("STREETVISION_BUNDLE", str(bundle))
    assert StreetVisionDetector()(sent) == answer
    (tmp_path / "bad.yaml").write_text("weights: x\n")
    with pytest.raises(StreetVisionError, match="needs 'bundle:"):
        StreetVisionDetector(config_name=str(tmp_path / "bad.yaml"))
    monkeypatch.delenv("STREETVISION_BUNDLE")
    with pytest.raises(StreetVisionError, match="STREETVISION_BUNDLE"):
        StreetVisionDetector()
