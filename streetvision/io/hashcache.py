"""Content hashes of files, cached by where and what they are, so a re-run does not re-read every image.

As DVC does, a local file's SHA-256 is remembered under its resolved path, size, modification time and
inode; an object's under its URI, size and ETag. A changed file gets a new key and is hashed again. The
cache is an SQLite file (``$STREETVISION_CACHE_DIR``, else ``$XDG_CACHE_HOME/streetvision``, else
``~/.cache/streetvision``); where it cannot be opened, hashes are simply computed.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from streetvision.io.atomic import compute_file_sha256

_STALE_S = 30 * 24 * 3600  # entries unused for a month are dropped


def _location() -> Path:
    if explicit := os.environ.get("STREETVISION_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streetvision"


class HashCache:
    def __init__(self, path: Path | None = None):
        self.db: sqlite3.Connection | None = None
        try:
            path = path or _location() / "hashes.sqlite"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=10)
            self.db.execute("CREATE TABLE IF NOT EXISTS h (key TEXT PRIMARY KEY, sha256 TEXT, used REAL)")
            self.db.execute("DELETE FROM h WHERE used < ?", (time.time() - _STALE_S,))
        except (OSError, sqlite3.Error):
            self.db = None
        self._new: list[tuple[str, str, float]] = []

    def get(self, key: str) -> str | None:
        if self.db is None:
            return None
        try:
            row = self.db.execute("SELECT sha256 FROM h WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error:
            return None
        if row:
            self._new.append((key, row[0], time.time()))
        return row[0] if row else None

    def put(self, key: str, sha256: str) -> str:
        self._new.append((key, sha256, time.time()))
        return sha256

    def file_sha256(self, path: Path) -> str:
        st = path.stat()
        key = f"file:{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        return self.get(key) or self.put(key, compute_file_sha256(path))

    def close(self) -> None:
        if self.db is None:
            return
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO h VALUES (?, ?, ?)", self._new)
        except sqlite3.Error:
            pass
        self.db.close()
        self.db = None

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *_) -> None:
        self.close()
