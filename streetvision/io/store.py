"""One API over local paths and ``s3://`` URIs.

Only this module talks to the object store. It is configured by the standard AWS variables alone
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``), which boto3 reads itself. Transfers go through boto3's transfer manager; retries
come from botocore's retry configuration. A step directory is uploaded objects first, ``manifest.json``
last, and downloaded manifest first, then verified.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from functools import cache
from pathlib import Path

from streetvision.errors import StreetVisionError
from streetvision.io import atomic, lease
from streetvision.io.lease import LOCK
from streetvision.io.manifests import (
    MANIFEST,
    Manifest,
    ManifestError,
    check_relative,
    expected_step,
    load_manifest,
    manifest_sha256,
    parse_manifest,
    redact_text,
    verify_dir,
)

MiB = 1024 * 1024


class StoreError(StreetVisionError):
    """The object store refused or failed a request; the message never contains credentials."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def check_location(value: str, what: str) -> None:
    """Refuse a location that looks like a URI but is not ``s3://`` as spelt (``s3:/b``, ``S3://b``,
    ``gs://b``): taken for a folder name, it would be written on local disk."""
    if _SCHEME.match(value) and not value.startswith("s3://"):
        raise StoreError(
            f"{what} {value}: not a folder and not an s3:// URI (the scheme is s3://, lowercase)"
        )


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise StoreError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise StoreError(f"s3 URI without a bucket: {uri!r}")
    if "@" in bucket:
        raise StoreError(
            f"{redact_text(uri)}: an s3:// URI carries no credentials; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY in the environment"
        )
    return bucket, key.strip("/")


def _key(prefix: str, name: str) -> str:
    """The object key of ``name`` under ``prefix`` (a bucket's root when empty)."""
    return f"{prefix}/{name}" if prefix else name


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


@cache
def _session():
    """One boto3 session a process tree: it holds botocore's loaded service model (about 0.2 s of JSON to
    parse, up to a second in a fresh DataLoader worker competing for the CPU) and no connection."""
    import boto3

    return boto3.session.Session()


@cache
def _client():
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": 8},
        max_pool_connections=32,
        s3={"addressing_style": "path"},
        # Integrity is end to end: every download is checked against the manifest's SHA-256, so the
        # per-request CRC (CPU spent twice on every byte) is left to the operations that require it.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    try:
        return _session().client("s3", config=config)
    except ValueError as e:  # botocore's "Invalid endpoint: <value>": the variables are named, not the value
        raise StoreError(
            f"the object store's endpoint is not a URL ({str(e).split(':')[0]}); check AWS_ENDPOINT_URL_S3 "
            "and AWS_ENDPOINT_URL (e.g. http://host:8333)"
        ) from None


_CLIENT_LOCK = threading.Lock()


def client():
    """This process's S3 client from the environment, with botocore's standard retry mode for transient
    errors; made once, however many threads (litdata's downloaders) ask at the same time."""
    with _CLIENT_LOCK:
        return _client()


def reset_clients() -> None:
    """Forget the session and clients, to read the ``AWS_*`` variables again (they changed)."""
    with _CLIENT_LOCK:
        _session.cache_clear()
        _client.cache_clear()
        arrow_fs.cache_clear()


@cache
def arrow_fs():
    """A pyarrow S3 file system from the same variables as :func:`client` (ranged reads of parquet shards:
    a column of a row group, not the whole object)."""
    from pyarrow import fs

    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or ""
    scheme, _, host = endpoint.partition("://") if "://" in endpoint else ("https", "", "")
    return fs.S3FileSystem(
        access_key=env.get("AWS_ACCESS_KEY_ID"),
        secret_key=env.get("AWS_SECRET_ACCESS_KEY"),
        session_token=env.get("AWS_SESSION_TOKEN"),
        region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
        endpoint_override=host.rstrip("/") or None,
        scheme=scheme,
        force_virtual_addressing=False,
    )


def _forget_clients() -> None:
    """A forked process (a DataLoader worker) makes its own clients: the parent's pooled keep-alive
    connections are shared sockets after a fork, and two processes reading one get each other's bytes.
    The session, which holds no connection, is kept."""
    global _CLIENT_LOCK
    _CLIENT_LOCK = threading.Lock()  # another thread may have held it at the fork
    _client.cache_clear()
    arrow_fs.cache_clear()


os.register_at_fork(after_in_child=_forget_clients)


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=32 * MiB, multipart_chunksize=32 * MiB, max_concurrency=8, use_threads=True
    )


@contextmanager
def _errors(action: str, uri: str) -> Iterator[None]:
    """Turn botocore failures into one line naming the URI and the remedy, never a credential."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise StoreError(
            f"{action} {uri}: no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    except ClientError as e:
        err = e.response.get("Error", {})
        code = err.get("Code", "?")
        hint = ""
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            hint = "; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"
        elif code in ("NoSuchBucket",):
            hint = "; create the bucket or fix the URI"
        elif code in ("404", "NoSuchKey"):
            hint = "; the object does not exist"
        raise StoreError(f"{action} {uri}: {code}{hint}") from None
    except BotoCoreError as e:
        # These messages name endpoints and files, not secrets.
        raise StoreError(f"{action} {uri}: {type(e).__name__}: {e}") from None


def _manager():
    from boto3.s3.transfer import create_transfer_manager

    return create_transfer_manager(client(), _transfer_config())


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    with _errors("stat", uri):  # an unreachable endpoint too: one line, not a traceback
        try:
            client().head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return False
            raise
    return True


def list_objects(uri: str) -> dict[str, tuple[int, str]]:
    """Keys under an s3 prefix, relative to it, with their size and ETag."""
    bucket, prefix = split_s3(uri)
    prefix = prefix + "/" if prefix else ""
    found: dict[str, tuple[int, str]] = {}
    with _errors("list", uri):
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found |= {o["Key"][len(prefix) :]: (o["Size"], o["ETag"]) for o in page.get("Contents", [])}
    return found


def list_files(uri: str) -> list[str]:
    """Keys under an s3 prefix, relative to it."""
    return list(list_objects(uri))


def upload_file(path: str | os.PathLike, uri: str) -> None:
    bucket, key = split_s3(uri)
    with _errors("upload to", uri):
        client().upload_file(str(path), bucket, key, Config=_transfer_config())


def download_file(uri: str, path: str | os.PathLike) -> atomic.Written:
    """Download one object atomically (temp file beside the target, then rename) and return its hash."""
    bucket, key = split_s3(uri)
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    try:
        with _errors("download", uri):
            client().download_file(bucket, key, tmp, Config=_transfer_config())
        digest, size = atomic.compute_file_sha256(tmp), Path(tmp).stat().st_size
        os.replace(tmp, final)
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic.fsync_dir(final.parent)
    return atomic.Written(final, size, digest)


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        return Path(uri).read_bytes()
    bucket, key = split_s3(uri)
    with _errors("read", uri):
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write one small object or file whole: atomically on disk, one PUT on the object store."""
    if not is_s3(uri):
        atomic.write_bytes(uri, data)
        return
    bucket, key = split_s3(uri)
    with _errors("write", uri):
        client().put_object(Bucket=bucket, Key=key, Body=data)


UPLOADING = ".streetvision-uploading"  # the marker of versions before the lock: a killed writer's leftover
# Objects of a prefix that no manifest lists and that are not leftovers: the lock, while it is held.
BOOKKEEPING = frozenset({LOCK})


def _read_manifest(uri: str) -> tuple[Manifest, bytes] | None:
    try:
        raw = read_bytes(join(uri, MANIFEST))
    except StoreError as e:
        if "404" in str(e) or "NoSuchKey" in str(e):
            return None
        raise
    return parse_manifest(raw, join(uri, MANIFEST)), raw


def _parents(uri: str) -> list[str]:
    """The prefixes above ``uri`` in its bucket, nearest first (s3://b/a/b/c -> s3://b/a/b, s3://b/a)."""
    bucket, key = split_s3(uri)
    parts = key.split("/")
    return [f"s3://{bucket}/{'/'.join(parts[:i])}" for i in range(len(parts) - 1, 0, -1)]


def check_out(uri: str, step: str) -> None:
    """Refuse an ``s3://`` output prefix that lies inside a commit, holds another step's commit, or holds
    objects that are neither a commit nor a killed writer's leftovers."""
    for parent in _parents(uri):
        if exists(join(parent, MANIFEST)):
            raise ManifestError(
                f"--out {uri}: lies inside the committed step output {parent}; choose another"
            )
    found = _read_manifest(uri)
    if found is not None:
        expected_step(f"--out {uri}", found[0], step)
        return
    names = list_files(uri)
    if MANIFEST in names and (found := _read_manifest(uri)) is not None:  # committed since the first look
        expected_step(f"--out {uri}", found[0], step)
        return
    if names and not ({LOCK, UPLOADING} & set(names)):
        raise ManifestError(
            f"--out {uri}: holds {len(names)} object(s) but no StreetVision commit; refusing to replace them"
        )


def _clean(uri: str) -> None:
    """Under a freshly taken lock: remove what a killed writer left. A manifest that is there vouches for
    an intact commit (a writer removes it before it uploads anything), which stays; without one, every
    object but the lock goes."""
    bucket, prefix = split_s3(uri)
    names = set(list_files(uri)) - BOOKKEEPING
    found = _read_manifest(uri) if MANIFEST in names else None
    keep = {MANIFEST, *found[0].outputs} if found else set()
    with _errors("clean", uri):
        for name in sorted(names - keep):
            client().delete_object(Bucket=bucket, Key=_key(prefix, name))


@contextmanager
def writing(uri: str, step: str, run_id: str | None = None) -> Iterator[lease.Lease]:
    """Hold ``uri`` for one writer (see :mod:`streetvision.io.lease`), its leftovers cleaned first."""
    with lease.held(uri, step, run_id) as held:
        _clean(uri)
        yield held


def _unseal(uri: str, held: lease.Lease) -> None:
    """From now until a new manifest lands, the prefix held is no commit: its manifest goes first."""
    held.renew()
    if not held.dirty:
        held.dirty = True
        bucket, prefix = split_s3(uri)
        with _errors("upload to", uri):
            client().delete_object(Bucket=bucket, Key=_key(prefix, MANIFEST))


def upload_dir(
    local: str | os.PathLike, uri: str, held: lease.Lease | None = None, sent: frozenset[str] = frozenset()
) -> Manifest:
    """Upload a committed step directory under the prefix's lock: the earlier manifest removed, every
    listed output, objects the new commit does not list removed, and ``manifest.json`` last, created only
    where none is (``IfNoneMatch``) and only while the lease is still this writer's. ``sent``: outputs
    this writer uploaded already (:func:`offload`), checked by size against the listing.

    Sizes and listing are checked here; content hashes are checked by every download.
    """
    manifest = verify_dir(local, hashes=False, absent=sent)
    if held is None:
        with writing(uri, manifest.step) as held:
            return upload_dir(local, uri, held, sent)
    bucket, prefix = split_s3(uri)
    key = lambda name: _key(prefix, name)  # noqa: E731
    _unseal(uri, held)
    if sent:
        listed = list_objects(uri)
        if short := [n for n in sent if listed.get(n, (-1,))[0] != manifest.outputs[n]["size"]]:
            raise StoreError(
                f"upload to {uri}: {len(short)} object(s) sent early are missing or short ({short[0]})"
            )
    with _errors("upload to", uri):
        with _manager() as tm:
            futures = [
                tm.upload(str(Path(local, name)), bucket, key(name))
                for name in manifest.outputs
                if name not in sent
            ]
            for f in futures:
                f.result()
        for stale in set(list_files(uri)) - set(manifest.outputs) - {MANIFEST} - BOOKKEEPING:
            client().delete_object(Bucket=bucket, Key=key(stale))
    held.renew()  # still this writer's, and for a whole lease more: the manifest lands within it
    from botocore.exceptions import ClientError

    with _errors("commit", uri):
        try:
            client().put_object(
                Bucket=bucket, Key=key(MANIFEST), Body=Path(local, MANIFEST).read_bytes(), IfNoneMatch="*"
            )
        except ClientError as e:
            if not lease.precondition_failed(e):
                raise
            raise ManifestError(
                f"--out {uri}: another writer committed there meanwhile; nothing replaced"
            ) from None
    held.dirty = False
    return manifest


def clean_output(uri: str) -> str:
    """What :command:`streetvision clean` does to one output nobody writes now: an earlier commit a killed
    writer left aside put back, and a killed writer's partial files or objects removed."""
    if not is_s3(uri):
        from streetvision.io.outputs import clean_folder

        return clean_folder(Path(uri))
    if not {LOCK, UPLOADING} & set(list_files(uri)):
        return "nothing to clean"
    with writing(uri, "clean"):  # refused, naming the holder, while a writer holds it
        pass  # taking the prefix removes a killed writer's leftovers; an intact commit stays
    return "committed" if _read_manifest(uri) else "leftovers removed"


def check_unlocked(uri: str) -> None:
    """Refuse a prefix that a writer holds now: what is there is no commit until it finishes."""
    if (who := lease.holder(uri)) is not None:
        raise ManifestError(f"{uri}: being written by {who}; not a commit until it finishes")


def download_dir(uri: str, local: str | os.PathLike, step: str | None = None) -> Manifest:
    """Download a committed step directory, manifest first, and verify it (of ``step``, when given).

    The manifest is checked before any other object is fetched; objects it does not list refuse the
    whole prefix. The local manifest is written last.
    """
    bucket, prefix = split_s3(uri)
    local = Path(local)
    found = _read_manifest(uri)
    if found is None:
        raise ManifestError(f"{uri}: no {MANIFEST}; the step is not committed there")
    manifest, raw = found
    expected_step(uri, manifest, step)
    names = set(list_files(uri))
    if LOCK in names:
        check_unlocked(uri)
    extra = sorted(names - set(manifest.outputs) - {MANIFEST, LOCK})
    if extra:
        raise ManifestError(f"{uri}: {len(extra)} object(s) not listed in manifest: {', '.join(extra[:3])}")
    local.mkdir(parents=True, exist_ok=True)
    (local / MANIFEST).unlink(missing_ok=True)
    with _errors("download", uri), _manager() as tm:
        futures = []
        for name in manifest.outputs:
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            futures.append(tm.download(bucket, _key(prefix, name), str(local / name)))
        for f in futures:
            f.result()
    atomic.write_bytes(local / MANIFEST, raw)
    try:
        return verify_dir(local, step)
    except ManifestError as e:
        raise ManifestError(str(e).replace(str(local), uri)) from None


def committed_manifest(uri: str, step: str | None = None) -> Manifest:
    """The manifest of a committed prefix, checked without downloading its objects: of ``step``, no
    writer holding it, every listed object there at its size and nothing else. Contents are checked
    by whoever downloads them, against the manifest's SHA-256."""
    split_s3(uri)  # a bucket, at least
    found = _read_manifest(uri)
    if found is None:
        raise ManifestError(f"{uri}: no {MANIFEST}; the step is not committed there")
    manifest = found[0]
    expected_step(uri, manifest, step)
    objects = list_objects(uri)
    if LOCK in objects:
        check_unlocked(uri)
    extra = sorted(set(objects) - set(manifest.outputs) - {MANIFEST, LOCK})
    if extra:
        raise ManifestError(f"{uri}: {len(extra)} object(s) not listed in manifest: {', '.join(extra[:3])}")
    for name, meta in sorted(manifest.outputs.items()):
        if name not in objects:
            raise ManifestError(f"{uri}: {name} listed in manifest is missing")
        if objects[name][0] != meta["size"]:
            raise ManifestError(f"{uri}: {name}: size {objects[name][0]} != {meta['size']} in manifest")
    return manifest


def download_tree(uri: str, local: str | os.PathLike) -> list[str]:
    """Download every object under a prefix (e.g. a dataset)."""
    bucket, prefix = split_s3(uri)
    names = sorted(list_files(uri))
    if not names:
        raise StoreError(f"download {uri}: no objects under this prefix")
    with _errors("download", uri), _manager() as tm:
        futures = []
        for name in names:
            dest = Path(local, check_relative(name))
            dest.parent.mkdir(parents=True, exist_ok=True)
            futures.append(tm.download(bucket, _key(prefix, name), str(dest)))
        for f in futures:
            f.result()
    return names


def upload_tree(local: str | os.PathLike, uri: str, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Upload every file under a local folder (e.g. a dataset) to an ``s3://`` prefix."""
    bucket, prefix = split_s3(uri)
    root = Path(local)
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    names = [n for n in names if n not in exclude]
    with _errors("upload to", uri), _manager() as tm:
        for f in [tm.upload(str(root / n), bucket, _key(prefix, n)) for n in names]:
            f.result()
    return names


@contextmanager
def local_file(uri: str) -> Iterator[str]:
    """A local path of one file: the path itself, or a temporary download of an ``s3://`` object."""
    if not is_s3(uri):
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="sv-file-") as tmp:
        yield str(download_file(uri, Path(tmp) / Path(split_s3(uri)[1]).name).path)


@contextmanager
def local_tree(uri: str | os.PathLike, prefix: str = "sv-in-") -> Iterator[Path]:
    """A local folder: the folder itself, or a temporary download of every object under an s3 prefix."""
    if not is_s3(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        download_tree(str(uri), tmp)
        yield Path(tmp)


@contextmanager
def staged_step(uri: str | os.PathLike, step: str | None = None) -> Iterator[Path]:
    """A step directory on local disk: the folder itself, for a reader that verifies it (each step's
    ``run`` does), or a download of an ``s3://`` one, verified as it lands."""
    if not is_s3(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="sv-in-") as tmp:
        download_dir(str(uri), Path(tmp) / "step", step)
        yield Path(tmp) / "step"


@contextmanager
def local_step(uri: str | os.PathLike, step: str | None = None) -> Iterator[Path]:
    """A verified local step directory (of ``step``, when given): the folder itself after
    :func:`verify_dir`, or a verified download of an ``s3://`` one."""
    with staged_step(uri, step) as root:
        if not is_s3(uri):
            verify_dir(root, step)
        yield root


def verified(uri: str, step: str | None = None) -> tuple[Manifest, str]:
    """(manifest, sha256 of manifest.json) of a committed, intact step output; raises naming the problem."""
    with local_step(uri, step) as root:
        return load_manifest(root, step), manifest_sha256(root)


def _rank_zero() -> bool:
    """Whether this process is the one that commits (rank 0 of a distributed run, or the only one)."""
    env = os.environ
    if "RANK" in env:
        return env["RANK"] == "0"
    return env.get("NODE_RANK", "0") == "0" and env.get("LOCAL_RANK", "0") == "0"


@contextmanager
def output_step(uri: str | os.PathLike, step: str = "", run_id: str | None = None) -> Iterator[Path]:
    """A local directory to write a step into. For an ``s3://`` output the prefix is held for this writer
    from now (before any work: a second writer is refused in one line) until the upload, manifest last."""
    if not is_s3(uri):
        yield Path(uri)
        return
    with ExitStack() as stack:
        held = stack.enter_context(writing(str(uri), step, run_id)) if _rank_zero() else None
        local = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sv-out-"))) / "out"
        sent: set[str] = set()
        token = _REMOTE.set((local, str(uri), held, sent) if held is not None else None)
        try:
            yield local  # the step's local lock and staging stay inside the temporary folder
        finally:
            _REMOTE.reset(token)
        # A step that committed nothing without failing is a non-zero DDP rank: rank 0 uploads.
        if (local / MANIFEST).exists():
            upload_dir(local, str(uri), held, frozenset(sent))


# The s3:// output the current step writes through a local folder: (that folder, URI, lease, names sent).
_REMOTE: ContextVar[tuple[Path, str, lease.Lease, set[str]] | None] = ContextVar("remote", default=None)


def offload(final: Path, name: str, path: Path) -> bool:
    """Send one finished output file of the step writing ``final`` to its ``s3://`` output now, under the
    step's lease, and remove the local copy (a large output never sits whole on local disk); False, and
    nothing done, where ``final`` is not such an output. The manifest still lands last."""
    remote = _REMOTE.get()
    if remote is None or remote[0] != Path(final):
        return False
    _, uri, held, sent = remote
    _unseal(uri, held)
    upload_file(path, join(uri, name))
    sent.add(name)
    Path(path).unlink()
    return True
