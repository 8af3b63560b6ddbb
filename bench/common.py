"""Timing and reporting helpers shared by the benchmark suites."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

WORK = Path(".bench")


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` runs (the least disturbed by a noisy machine)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def report(name: str, ours: float, reference: float, target: str, ok: bool, unit: str = "s") -> None:
    ratio = ours / reference if reference else float("inf")
    verdict = "OK" if ok else "MISSED"
    print(
        f"{name}: ratio {ratio:.3f} (ours {ours:.3f}{unit}, reference {reference:.3f}{unit}; target {target}) {verdict}",
        flush=True,
    )
