"""The CLI in a child process forked from a small server process, for tests that start hundreds of steps.

A child forked from the test process itself inherits whatever that process has grown to (torch, models,
pytest's state), and the copying shows: a kill matrix ran 3x slower late in a long session than alone.
:mod:`multiprocessing`'s ``forkserver`` forks each child from a process that has imported only the CLI
and the steps: starting one costs milliseconds, as a fresh process never could (imports take seconds).
The child gets the caller's environment and temporary folder of the moment it is started.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
import tempfile
import time
from contextlib import contextmanager

PRELOAD = [  # what the non-training steps import, lazily or not: paid once, in the server
    "forkcli",
    "numpy",
    "yaml",
    "omegaconf",
    "PIL.Image",
    "matplotlib",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "boto3",
    "boto3.s3.transfer",
    "botocore.session",
    "botocore.config",
    "streetvision.cli",
    "streetvision.verify",
    "streetvision.kfp_executor",
    "streetvision.data.dataset",
    "streetvision.data.demo",
    "streetvision.eval.report",
    "streetvision.io.outputs",
    "streetvision.io.store",
    "streetvision.steps.make_splits",
    "streetvision.steps.sweep_thresholds",
    "streetvision.steps.calibrate_scrc",
    "streetvision.steps.export_bundle",
]
_context = None


def context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


class SlowTransfers:
    """The transfer manager with a pause after each upload: a window to kill an upload in."""

    def __init__(self, tm, pause: float):
        self.tm, self.pause = tm, pause

    def upload(self, *args, **kw):
        future = self.tm.upload(*args, **kw)
        future.result()
        time.sleep(self.pause)
        return future


def _child(argv: list[str], env: dict[str, str], tmp: str | None, pause: float) -> None:
    code = 99
    try:
        os.environ.clear()
        os.environ.update(env)
        tempfile.tempdir = tmp
        from streetvision.cli import main
        from streetvision.io import store

        store.reset_clients()
        if pause:
            real = store._manager

            @contextmanager
            def slow():
                with real() as tm:
                    yield SlowTransfers(tm, pause)

            store._manager = slow
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
        code = main(argv)
    finally:
        os._exit(code)


def start(argv: list, *, pause: float = 0.0):
    """Start ``streetvision <argv>`` in a forked child; returns its :class:`multiprocessing.Process`.
    ``pause``: seconds to wait after each uploaded object."""
    process = context().Process(
        target=_child, args=([str(a) for a in argv], dict(os.environ), tempfile.tempdir, pause), daemon=True
    )
    process.start()
    return process


def wait(process, timeout: float = 120.0) -> int:
    """The child's exit code; one that runs past ``timeout`` is killed and fails the test."""
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise AssertionError(f"child {process.pid} did not finish within {timeout}s")
    return process.exitcode


def running(process) -> bool:
    return process.exitcode is None and process.is_alive()
