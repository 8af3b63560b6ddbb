"""One writer per ``s3://`` output: a lock object taken by a conditional create, held under a lease.

The object store has no ``flock``. A writer of a prefix first creates ``<prefix>/.streetvision-lock``
with ``IfNoneMatch='*'`` (exactly one of simultaneous writers succeeds), carrying its run id, step, host,
pid and lease. While it works, a thread renews the lease (``IfMatch`` on the lock's ETag, so a writer
that lost the lock finds out). A lock whose lease has run out, by the store's own clock (the age of the
object against the response's ``Date``), was left by a killed writer: the next writer takes it over with
``IfMatch`` on that stale ETag, and removes the killed writer's leftovers before anything lands. Readers
refuse a prefix whose lock is held. See :func:`streetvision.io.store.upload_dir` for the commit itself.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from streetvision.config import strict_json
from streetvision.errors import StreetVisionError

LOCK = ".streetvision-lock"
DEFAULT_LEASE_S = 60.0


def lease_seconds() -> float:
    """The lease a writer takes: ``STREETVISION_LEASE_S`` (seconds), 60 by default; renewed every quarter."""
    raw = os.environ.get("STREETVISION_LEASE_S", "")
    try:
        value = float(raw) if raw else DEFAULT_LEASE_S
    except ValueError:
        raise StreetVisionError(f"STREETVISION_LEASE_S={raw!r}: not a number of seconds") from None
    if not 1 <= value <= 86400:
        raise StreetVisionError(f"STREETVISION_LEASE_S={raw!r}: between 1 and 86400 seconds")
    return value


class LockHeld(StreetVisionError):
    """Another writer holds the prefix."""


def _store():
    from streetvision.io import store

    return store


def _key(uri: str) -> tuple[str, str]:
    return _store().split_s3(_store().join(uri, LOCK))


def precondition_failed(e) -> bool:
    """A conditional write refused (HTTP 412): the object is not what the condition said."""
    error = e.response.get("Error", {})
    return (
        error.get("Code") in ("PreconditionFailed", "412")
        or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412
    )


def read(uri: str) -> tuple[dict[str, Any], str, float] | None:
    """(the lock's body, its ETag, its age in seconds by the store's clock), or None without a lock."""
    from botocore.exceptions import ClientError

    bucket, key = _key(uri)
    with _store()._errors("read the lock of", uri):
        try:
            r = _store().client().get_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return None
            raise
        raw = r["Body"].read()
    now = parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
    age = (now - r["LastModified"]).total_seconds()
    try:
        body = strict_json(raw.decode("utf-8"))
        body = body if isinstance(body, dict) else {}
    except (UnicodeDecodeError, ValueError):
        body = {}  # a lock of an older version, or garbage: it holds for the default lease
    return body, r["ETag"], age


def _lease_of(body: dict[str, Any]) -> float:
    value = body.get("lease_s")
    return float(value) if isinstance(value, int | float) and 0 < value < 1e6 else DEFAULT_LEASE_S


def describe(body: dict[str, Any], age: float) -> str:
    """Who holds a lock, in words (no credential is ever in a lock)."""
    who = f"run {body.get('run_id', '?')} ({body.get('step', '?')} on {body.get('host', '?')}, pid {body.get('pid', '?')})"
    return f"{who}, its lease renewed {age:.0f}s ago and running {max(0.0, _lease_of(body) - age):.0f}s more"


def _held(body: dict[str, Any], age: float) -> bool:
    """A lock within its lease, whose writer did not give it up."""
    return age <= _lease_of(body) and not body.get("abandoned")


def holder(uri: str) -> str | None:
    """Who writes ``uri`` now (a lock within its lease), in words; None when nobody does."""
    found = read(uri)
    if found is None:
        return None
    body, _, age = found
    return describe(body, age) if _held(body, age) else None


class Lease:
    """A held lock on an ``s3://`` prefix; a daemon thread renews it every quarter of the lease."""

    def __init__(self, uri: str, etag: str, body: dict[str, Any]):
        self.uri, self.etag, self.body = uri, etag, body
        self.lease_s = float(body["lease_s"])
        self.lost: str | None = None
        self.dirty = False  # the prefix holds a partial upload: released, the lock stays as its marker
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="sv-lease", daemon=True)
        self._thread.start()

    def _put(self, body: dict[str, Any], **condition) -> str:
        bucket, key = _key(self.uri)
        data = json.dumps(body, sort_keys=True).encode()
        return _store().client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]

    def renew(self) -> None:
        """Extend the lease now; raises when the lock is no longer this writer's."""
        from botocore.exceptions import ClientError

        with self._mutex:
            if self.lost:
                raise StreetVisionError(self.lost)
            with _store()._errors("renew the lock of", self.uri):
                try:
                    self.etag = self._put(self.body, IfMatch=self.etag)
                    return
                except ClientError as e:
                    if not precondition_failed(e):
                        raise
            found = read(self.uri)
            who = describe(found[0], found[2]) if found else "nobody (the lock was removed)"
            self.lost = (
                f"--out {self.uri}: this writer's lease ran out and the prefix is now held by {who}; "
                "nothing more is written"
            )
            raise StreetVisionError(self.lost)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                self.renew()
            except StreetVisionError:
                if self.lost:
                    return  # the commit checks again and refuses
                # a transient store error: the next beat tries again, within the lease

    def release(self) -> None:
        """Stop renewing and give the lock up, if it is still this writer's: removed, or, over a partial
        upload, kept as the mark of leftovers that the next writer removes (``abandoned``)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self.lost:
            return
        bucket, key = _key(self.uri)
        try:
            with _store()._errors("release the lock of", self.uri):
                if self.dirty:
                    self._put({**self.body, "abandoned": True}, IfMatch=self.etag)
                else:
                    _store().client().delete_object(Bucket=bucket, Key=key, IfMatch=self.etag)
        except StreetVisionError:
            pass  # a lock that stays behind runs out with its lease


def _body(step: str, run_id: str | None, lease_s: float) -> dict[str, Any]:
    return {
        "run_id": run_id or "",
        "step": step,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "lease_s": lease_s,
        "taken_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def take(uri: str, step: str, run_id: str | None = None) -> Lease:
    """Take the prefix for one writer, or raise :class:`LockHeld` in one line naming the holder. A lock
    whose lease ran out is taken over; one held by an earlier attempt of the same run (a retried task) is
    waited for until its lease runs out."""
    from botocore.exceptions import ClientError

    lease_s = lease_seconds()
    body = _body(step, run_id, lease_s)
    bucket, key = _key(uri)
    data = json.dumps(body, sort_keys=True).encode()
    deadline = time.monotonic() + lease_s + 5
    while True:
        condition: dict[str, str] = {"IfNoneMatch": "*"}
        found = read(uri)
        if found is not None:
            theirs, etag, age = found
            if _held(theirs, age):
                same_run = bool(run_id) and theirs.get("run_id") == run_id
                if same_run and time.monotonic() < deadline:
                    time.sleep(min(2.0, _lease_of(theirs) - age + 0.5))
                    continue
                raise LockHeld(
                    f"--out {uri}: being written by {describe(theirs, age)}; wait for it or choose another --out"
                )
            condition = {"IfMatch": etag}  # run out: take it over, unless another writer just did
        with _store()._errors("lock", uri):
            try:
                etag = _store().client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
                return Lease(uri, etag, body)
            except ClientError as e:
                if not precondition_failed(e):
                    raise
        found = read(uri)  # another writer won the race: name it
        if found is None:
            continue
        raise LockHeld(
            f"--out {uri}: being written by {describe(found[0], found[2])}; wait for it or choose another --out"
        )


@contextmanager
def held(uri: str, step: str, run_id: str | None = None) -> Iterator[Lease]:
    lease = take(uri, step, run_id)
    try:
        yield lease
    finally:
        lease.release()
