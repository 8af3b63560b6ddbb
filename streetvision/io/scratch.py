"""Every temporary file of a step under one root of its own, removed by the next step once its owner is dead.

A step's downloads (``sv-in-*``), staging of ``s3://`` outputs (``sv-out-*``), checkpoints being
uploaded, logs and the rest are made with :mod:`tempfile`, which :func:`step_root` points at
``$TMPDIR/streetvision-<uid>/<step>.<host>.<pid>.<pid start time>.<random>/`` for the step's lifetime (``TMPDIR``
too, for the processes it starts, such as DDP ranks): its name says who owns it. A step that
ends removes its root; one that is SIGKILLed cannot, and the next step on the machine, or
``streetvision clean``, removes every root whose owner is no longer running.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def base(tmp: str | os.PathLike | None = None) -> Path:
    """Where this user's step roots live: ``<tmp>/streetvision-<uid>`` (the system's temporary folder by
    default; one folder per user, so that users of a shared machine never block each other)."""
    return Path(tmp or tempfile.gettempdir()) / f"streetvision-{os.getuid()}"


def _started(pid: int) -> str | None:
    """The start time of a process (field 22 of /proc/<pid>/stat), which a reused pid does not share."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _name(stem: str) -> str:
    """A root's name says who owns it, so that it exists with its owner or not at all (a kill between
    making a folder and writing an owner file into it would leave a root nobody could judge)."""
    pid = os.getpid()
    host = socket.gethostname().replace(".", "_")[:48]
    return f"{stem}.{host}.{pid}.{_started(pid) or 0}."


def _alive(name: str) -> bool:
    try:
        _, host, pid, started, _ = name.split(".")
        pid_n = int(pid)
    except ValueError:
        return True  # not a root of ours: left alone
    if host != socket.gethostname().replace(".", "_")[:48]:
        return True  # another machine's (a shared folder): never ours to judge
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    now = _started(pid_n)
    return now is None or started in ("0", now)


def clean(tmp: str | os.PathLike | None = None) -> list[Path]:
    """Remove every step root under ``tmp`` whose owner is dead; returns the roots removed."""
    root = base(tmp)
    if not root.is_dir():
        return []
    removed = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and not folder.is_symlink() and not _alive(folder.name):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextmanager
def step_root(stem: str) -> Iterator[Path]:
    """A temporary root of this step's own for everything it writes to a temporary folder."""
    here = base()
    here.mkdir(mode=0o700, parents=True, exist_ok=True)
    clean(here.parent)
    root = Path(tempfile.mkdtemp(prefix=_name(stem), dir=here))
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = str(root), str(root)
    try:
        yield root
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]
        shutil.rmtree(root, ignore_errors=True)
