"""The one path-containment check: a relative name read from a file (an index row, a bundle entry, a
manifest output) must name something inside its root, and has one spelling.

:func:`relative_name` is the pure check (no filesystem): no absolute path, no drive, no backslash, no NUL,
no ``..``; ``./`` and repeated slashes are collapsed, so ``images/./a.jpg`` and ``images//a.jpg`` are
``images/a.jpg``. :func:`inside` then resolves links on disk and refuses a target outside the root.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath


class PathEscape(ValueError):
    """A name that does not stay inside its root; the message says why."""


def relative_name(name: object) -> str:
    """``name`` in its one normal spelling, or :class:`PathEscape` saying why it is not a relative name."""
    if not isinstance(name, str) or not name.strip():
        raise PathEscape(f"empty or non-string path {name!r}")
    if "\x00" in name or "\\" in name:
        raise PathEscape(f"path {name!r} holds a NUL byte or a backslash")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ":" in pure.parts[0]:
        raise PathEscape(f"absolute path {name!r}")
    if ".." in pure.parts:
        raise PathEscape(f"path {name!r} has a '..' component")
    normal = pure.as_posix()
    if normal in ("", "."):
        raise PathEscape(f"path {name!r} names no file")
    return normal


def inside(root: str | Path, name: object) -> Path:
    """The resolved path of ``name`` under ``root``: :func:`relative_name`, then links followed, and a
    target outside ``root`` refused."""
    root = Path(root).resolve()
    target = (root / relative_name(name)).resolve()
    if not target.is_relative_to(root):
        raise PathEscape(f"{name!r} is a link that leads outside (to {target})")
    return target


def canonical(root: str | Path, name: object) -> str:
    """The one spelling of ``name`` relative to ``root`` after links are followed: two names of one
    file have one canonical name."""
    root = Path(root).resolve()
    return inside(root, name).relative_to(root).as_posix()
