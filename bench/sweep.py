"""sweep_thresholds benchmarks: exact sweep vs scikit-learn, and the whole sweep-thresholds process."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np

from bench.common import WORK, best_of, report


def bench_exact_sweep() -> None:
    from sklearn.metrics import confusion_matrix_at_thresholds

    from streetvision.eval import sweep
    from streetvision.eval.metrics import mcc_from_counts

    rng = np.random.default_rng(0)
    n = 10_000_000
    labels = rng.integers(0, 2, n)
    scores = np.clip(labels * 0.2 + rng.random(n) * 0.8, 0, 1).round(6)  # ties, as real scores have

    def ours():
        return sweep.choose_threshold(sweep.exact_sweep(scores, labels))

    def sklearn():
        tns, fps, fns, tps, thresholds = confusion_matrix_at_thresholds(labels, scores)
        mcc = mcc_from_counts(tps, tns, fps, fns)
        return thresholds[int(np.argmax(mcc))]

    t_ref, t_ours = best_of(sklearn, 2), best_of(ours, 2)
    report(
        "exact sweep + max-MCC policy on 1e7 scores vs sklearn confusion_matrix_at_thresholds + MCC",
        t_ours,
        t_ref,
        "<= 1",
        t_ours <= t_ref,
    )


def bench_sweep_process() -> None:
    sys.path.insert(0, "tests")
    from baseline_fake import fake_baseline, separable_logits

    root = WORK / "sweep-proc"
    shutil.rmtree(root, ignore_errors=True)
    logits, labels = separable_logits(100_000, seed=1, noise=1.5)
    p1 = fake_baseline(root / "p1", logits, labels)
    cmd = [
        sys.executable,
        "-m",
        "streetvision",
        "sweep-thresholds",
        "--baseline",
        str(p1),
        "--out",
        str(root / "out"),
    ]

    def step():
        subprocess.run(cmd, check=True, capture_output=True)

    def imports():
        subprocess.run([sys.executable, "-c", "import numpy, sklearn"], check=True)

    t_ref, t_ours = best_of(imports, 3), best_of(step, 3)
    report(
        "whole sweep-thresholds process on 1e5 scores vs python -c 'import numpy, sklearn'",
        t_ours,
        t_ref,
        "< 3",
        t_ours < 3 * t_ref,
    )


def bench_conformal_guarantee() -> None:
    """The guarantees of calibrate_scrc, simulated (tests/test_conformal.py's known world, 300 draws each): the mean
    realised risk of CRC against alpha, and how often Learn then Test exceeds alpha against delta."""
    sys.path.insert(0, "tests")
    from test_conformal import DRAWS, simulate

    for risk in ("error", "fnr"):
        for alpha in (0.05, 0.1):
            realised, _ = simulate(alpha, risk)
            report(f"CRC {risk} risk, alpha={alpha}: mean realised risk over {DRAWS} draws vs alpha",
                   float(realised.mean()), alpha, "<= alpha plus Monte-Carlo error (ratio <= 1)",
                   realised.mean() <= alpha + 3 * realised.std(ddof=1) / DRAWS**0.5, unit="")  # fmt: skip
            _, violated = simulate(alpha, risk, delta=0.1, n=2000, seed=1, sep=2.5)
            report(f"Learn then Test {risk} risk among answered, alpha={alpha}, delta=0.1: violation frequency vs delta",
                   violated, 0.1, "<= delta plus Monte-Carlo error (ratio <= 1)",
                   violated <= 0.1 + 3 * (0.1 * 0.9 / DRAWS) ** 0.5, unit="")  # fmt: skip


BENCHMARKS = [bench_exact_sweep, bench_sweep_process, bench_conformal_guarantee]
