"""Progress a person can follow: a live bar in a terminal (tqdm), one plain line every few seconds
elsewhere (Kubeflow's log view, a file), never a flood of carriage-return frames."""

from __future__ import annotations

import sys
import time

LINE_EVERY_S = 10.0


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """``what``: samples done of ``total``, their rate, the ETA and the bytes read; :meth:`update` after
    each batch of samples, :meth:`close` at the end (a last line with the totals)."""

    def __init__(self, what: str, total: int, *, stream=None, every_s: float = LINE_EVERY_S):
        self.what, self.total, self.done, self.bytes = what, total, 0, 0
        self.stream = stream or sys.stdout  # stderr is for the one line a failure writes
        self.start = self.last = time.monotonic()
        self.every_s = every_s
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit="img", file=self.stream, dynamic_ncols=True)

    def update(self, n: int, nbytes: int = 0) -> None:
        self.done += n
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(f"{_size(self.bytes)} read", refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = f"{left:.0f} s" if left != float("inf") else "?"
        return (f"{self.what}: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:.1f}/s, ETA {eta}, {_size(self.bytes)} read")  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            print(self.line().replace(", ETA 0 s", f", {time.monotonic() - self.start:.1f} s"),
                  file=self.stream, flush=True)  # fmt: skip
