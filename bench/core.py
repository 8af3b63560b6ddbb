"""Core benchmarks: single-pass atomic write + hash, vectorised metrics, object-store transfers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import WORK, best_of, report

GiB = 1024**3
MiB = 1024**2


def bench_atomic_write_hash() -> None:
    from streetvision.io import atomic

    WORK.mkdir(exist_ok=True)
    block = os.urandom(64 * MiB)
    n_blocks = GiB // len(block)

    def produce(f):
        for _ in range(n_blocks):
            f.write(block)

    def ours():
        atomic.write_with(WORK / "ours.bin", produce)

    def reference():
        with open(WORK / "ref.bin", "wb") as f:
            produce(f)
            f.flush()
            os.fsync(f.fileno())
        subprocess.run(["sha256sum", str(WORK / "ref.bin")], check=True, capture_output=True)

    t_ref, t_ours = best_of(reference, 2), best_of(ours, 2)
    report("atomic write+sha256 of 1 GiB vs write+fsync then sha256sum", t_ours, t_ref, "< 1", t_ours < t_ref)
    for name in ("ours.bin", "ref.bin"):
        (WORK / name).unlink()


def bench_metrics() -> None:
    from sklearn import metrics as skm

    from streetvision.eval.metrics import compute_all_metrics

    rng = np.random.default_rng(0)
    t = rng.integers(0, 2, 1_000_000)
    p = np.where(rng.random(t.size) < 0.8, t, 1 - t)

    def sklearn_all():
        return {
            "mcc": skm.matthews_corrcoef(t, p),
            "accuracy": skm.accuracy_score(t, p),
            "precision": skm.precision_score(t, p),
            "recall": skm.recall_score(t, p),
            "f1": skm.f1_score(t, p),
            "cm": skm.confusion_matrix(t, p),
        }

    ref_values, ours_values = sklearn_all(), compute_all_metrics(t, p)
    same = all(
        abs(ours_values[k] - ref_values[k]) < 1e-12 for k in ("mcc", "accuracy", "precision", "recall", "f1")
    )
    same &= ref_values["cm"].ravel().tolist() == [ours_values[k] for k in ("tn", "fp", "fn", "tp")]
    t_ref = best_of(sklearn_all, 3)
    t_ours = best_of(lambda: compute_all_metrics(t, p), 5)
    speedup = t_ref / t_ours
    print(
        f"compute_all_metrics on 1e6 labels vs scikit-learn calls: {speedup:.1f}x faster "
        f"(ratio {t_ours / t_ref:.4f}; ours {t_ours * 1e3:.1f} ms, sklearn {t_ref * 1e3:.1f} ms; "
        f"identical values: {same}; target >= 20x) {'OK' if speedup >= 20 and same else 'MISSED'}",
        flush=True,
    )


def bench_store_transfer() -> None:
    sys.path.insert(0, str(Path("tests").resolve()))
    import seaweed

    from streetvision.io import store
    from streetvision.io.outputs import StepOutputs

    WORK.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=WORK))
    server = seaweed.start(tmp / "weed")
    try:
        os.environ.update(server.env())
        store.reset_clients()
        src = StepOutputs(tmp / "step", "bench")
        block = os.urandom(64 * MiB)
        for i in range(8):  # 512 MiB in eight 64 MiB files
            src.write_bytes(f"shard{i}.bin", block[i:] + block[:i])
        src.commit(config={})
        aws = [
            str(Path(sys.executable).parent / "aws"),
            "s3",
            "cp",
            "--recursive",
            "--quiet",
            "--endpoint-url",
            server.endpoint,
        ]
        ours_uri, aws_uri = f"s3://{server.bucket}/ours", f"s3://{server.bucket}/aws"

        def up_ours():
            store.upload_dir(tmp / "step", ours_uri)

        def up_aws():
            subprocess.run([*aws, str(tmp / "step"), aws_uri], check=True)

        def down_ours():
            shutil.rmtree(tmp / "down", ignore_errors=True)
            store.download_dir(ours_uri, tmp / "down")

        def down_aws():
            shutil.rmtree(tmp / "down", ignore_errors=True)
            subprocess.run([*aws, aws_uri, str(tmp / "down")], check=True)

        t_up_aws, t_up_ours = best_of(up_aws, 2), best_of(up_ours, 2)
        report(
            "store upload 512 MiB step vs aws s3 cp --recursive",
            t_up_ours,
            t_up_aws,
            "<= 1",
            t_up_ours <= t_up_aws,
        )
        t_down_aws, t_down_ours = best_of(down_aws, 2), best_of(down_ours, 2)
        report(
            "store download+verify 512 MiB step vs aws s3 cp --recursive",
            t_down_ours,
            t_down_aws,
            "<= 1",
            t_down_ours <= t_down_aws,
        )
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


BENCHMARKS = [bench_atomic_write_hash, bench_metrics, bench_store_transfer]
