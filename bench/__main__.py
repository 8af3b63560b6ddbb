"""``python -m bench [name ...]``: run the benchmarks and print one ratio line each."""

from __future__ import annotations

import importlib
import sys

SUITES = ["bench.core", "bench.train", "bench.stream", "bench.sweep", "bench.subnet", "bench.explora"]


def main(argv: list[str]) -> int:
    wanted = set(argv)
    for name in SUITES:
        module = importlib.import_module(name)
        for bench in module.BENCHMARKS:
            if wanted and bench.__name__ not in wanted and name.split(".")[-1] not in wanted:
                continue
            bench()
    return 0


raise SystemExit(main(sys.argv[1:]))
