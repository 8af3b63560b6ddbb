"""One API over local paths and ``s3://`` URIs.

Only this module talks to the object store. It is configured by the standard AWS variables alone
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
``AWS_DEFAULT_REGION``), which boto3 reads itself. Transfers go through boto3's transfer manager; retries
come from botocore's retry configuration. A step directory is uploaded objects first, ``manifest.json``
last, and downloaded manifest first, then verified.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from streetvision.errors import StreetVisionError
from streetvision.io import atomic
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


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


@cache
def client():
    """An S3 client from the environment, with botocore's standard retry mode for transient errors."""
    import boto3
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
        return boto3.session.Session().client("s3", config=config)
    except ValueError as e:  # botocore's "Invalid endpoint: <value>": the variables are named, not the value
        raise StoreError(
            f"the object store's endpoint is not a URL ({str(e).split(':')[0]}); check AWS_ENDPOINT_URL_S3 "
            "and AWS_ENDPOINT_URL (e.g. http://host:8333)"
        ) from None


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


UPLOADING = ".streetvision-uploading"  # present while a step directory is being uploaded to a prefix


def _read_manifest(uri: str) -> tuple[Manifest, bytes] | None:
    try:
        raw = read_bytes(join(uri, MANIFEST))
    except StoreError as e:
        if "404" in str(e) or "NoSuchKey" in str(e):
            return None
        raise
    return parse_manifest(raw, join(uri, MANIFEST)), raw


def check_out(uri: str, step: str) -> None:
    """Refuse an ``s3://`` output prefix that holds another step's commit or objects that are no commit."""
    found = _read_manifest(uri)
    if found is not None:
        expected_step(f"--out {uri}", found[0], step)
        return
    names = list_files(uri)
    if names and UPLOADING not in names:
        raise ManifestError(
            f"--out {uri}: holds {len(names)} object(s) but no StreetVision commit; refusing to replace them"
        )


def upload_dir(local: str | os.PathLike, uri: str) -> Manifest:
    """Upload a committed step directory: every listed output first, ``manifest.json`` last.

    While it runs, a marker object says the prefix is being written and no manifest vouches for it;
    objects of an earlier commit that the new one does not list are removed before the manifest lands.
    Sizes and listing are checked here; content hashes are checked by every download.
    """
    manifest = verify_dir(local, hashes=False)
    bucket, prefix = split_s3(uri)
    key = lambda name: f"{prefix}/{name}" if prefix else name  # noqa: E731
    with _errors("upload to", uri):
        client().put_object(Bucket=bucket, Key=key(UPLOADING), Body=manifest.step.encode())
        client().delete_object(Bucket=bucket, Key=key(MANIFEST))
        with _manager() as tm:
            futures = [tm.upload(str(Path(local, name)), bucket, key(name)) for name in manifest.outputs]
            for f in futures:
                f.result()
        for stale in set(list_files(uri)) - set(manifest.outputs) - {MANIFEST, UPLOADING}:
            client().delete_object(Bucket=bucket, Key=key(stale))
        client().upload_file(str(Path(local, MANIFEST)), bucket, key(MANIFEST))
        client().delete_object(Bucket=bucket, Key=key(UPLOADING))
    return manifest


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
    extra = sorted(set(list_files(uri)) - set(manifest.outputs) - {MANIFEST})
    if extra:
        raise ManifestError(f"{uri}: {len(extra)} object(s) not listed in manifest: {', '.join(extra[:3])}")
    local.mkdir(parents=True, exist_ok=True)
    (local / MANIFEST).unlink(missing_ok=True)
    with _errors("download", uri), _manager() as tm:
        futures = []
        for name in manifest.outputs:
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            futures.append(tm.download(bucket, f"{prefix}/{name}" if prefix else name, str(local / name)))
        for f in futures:
            f.result()
    atomic.write_bytes(local / MANIFEST, raw)
    try:
        return verify_dir(local, step)
    except ManifestError as e:
        raise ManifestError(str(e).replace(str(local), uri)) from None


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
            futures.append(tm.download(bucket, f"{prefix}/{name}" if prefix else name, str(dest)))
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
        for f in [tm.upload(str(root / n), bucket, f"{prefix}/{n}" if prefix else n) for n in names]:
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


@contextmanager
def output_step(uri: str | os.PathLike) -> Iterator[Path]:
    """A local directory to write a step into; for an s3 URI it is uploaded (manifest last) afterwards."""
    if not is_s3(uri):
        yield Path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="sv-out-") as tmp:
        local = Path(tmp) / "out"  # the step's lock and staging stay inside the temporary folder
        yield local
        # A step that committed nothing without failing is a non-zero DDP rank: rank 0 uploads.
        if (local / MANIFEST).exists():
            upload_dir(local, str(uri))
