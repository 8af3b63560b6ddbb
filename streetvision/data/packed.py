"""Packed splits: each split's images decoded once, bounded in size and written as litdata chunks.

A pack_shards output holds, per split, litdata's ``<split>/index.json`` (every chunk's SHA-256 added) and
its chunks, and ``samples.json``: each split's ids and labels in the order they were packed. A sample is
``{"image": JPEG bytes, "label": 0/1, "index": position in its split}``.

Readers stream a split with :class:`Streamed` (a litdata ``StreamingDataset``) through a bounded local
cache. What they read is verified: the manifest first, then ``samples.json`` and every ``index.json``
against it, and each chunk as it is downloaded against the SHA-256 its verified index lists
(:class:`VerifyingS3Downloader`, boto3 through the same ``AWS_*`` variables as the rest of the code, so
plain ``http://`` endpoints work too). A local pack is verified whole before streaming.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from streetvision.errors import StreetVisionError
from streetvision.io import store
from streetvision.io.manifests import Manifest, ManifestError

STEP = "pack_shards"
SAMPLES = "samples.json"
LITDATA_INDEX = "index.json"
JPEG_QUALITY = 95


class PackError(StreetVisionError):
    """A pack that cannot be read as this step's input."""


def prepare(job: tuple[bytes, int, int]) -> tuple[str, bytes | None, float]:
    """(SHA-256 of the original bytes, what is stored, decode seconds) of one image: decoded once at
    reduced size (JPEG draft), EXIF orientation applied; one whose shorter side is longer than
    ``max_side`` is scaled down to it and stored as a JPEG, any other (and every one with ``max_side`` 0)
    as its original bytes, which decode exactly as the served image does. None: unreadable."""
    import time

    from PIL import Image

    from streetvision.data.images import load_rgb

    data, max_side, quality = job
    sha = hashlib.sha256(data).hexdigest()
    started = time.perf_counter()
    try:
        with Image.open(io.BytesIO(data)) as probe:  # the header: the original size, before any draft
            original = min(probe.size)
        image = load_rgb(io.BytesIO(data), max_side or 64)
        w, h = image.size
        # Nothing to save: the original bytes, decoded as served. (By the drafted size, a JPEG that the
        # draft halved exactly to max_side, a 1024 px one at 512, was stored whole.)
        if not max_side or original <= max_side:
            return sha, data, time.perf_counter() - started
        scale = max_side / min(w, h)
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
        return sha, out.getvalue(), time.perf_counter() - started
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return sha, None, time.perf_counter() - started


@dataclass
class Pack:
    """A verified pack: where it is, its manifest, each split's ids and labels, and each split's chunks
    (litdata's index, with their SHA-256)."""

    uri: str
    manifest: Manifest
    samples: dict[str, dict[str, list]]
    indexes: dict[str, dict]

    def split_uri(self, split: str) -> str:
        return store.join(self.uri, split)

    def ids(self, split: str) -> list[str]:
        return self.samples[split]["ids"]

    def labels(self, split: str) -> list[int]:
        return self.samples[split]["labels"]

    def lineage(self) -> dict[str, dict]:
        """What the pack was made from, as a reader's manifest records it: the splits (by their manifest's
        hash) and the dataset (by its content)."""
        return {name: dict(self.manifest.inputs[name]) for name in ("splits", "dataset")}

    def parts(self) -> dict[str, list[str]]:
        return {split: self.ids(split) for split in self.samples}


def _small(uri: str, manifest: Manifest, name: str) -> dict:
    """A small listed file of the pack, read and checked against the manifest."""
    meta = manifest.outputs.get(name)
    if meta is None:
        raise ManifestError(f"{uri}: the manifest lists no {name}")
    raw = store.read_bytes(store.join(uri, name)) if store.is_s3(uri) else Path(uri, name).read_bytes()
    if hashlib.sha256(raw).hexdigest() != meta["sha256"]:
        raise ManifestError(f"{store.join(uri, name)}: sha256 differs from manifest")
    return json.loads(raw)


def open_pack(uri: str | os.PathLike, manifest: Manifest | None = None) -> Pack:
    """The pack at a folder or ``s3://`` prefix, verified: manifest first (of pack_shards), then what it
    lists. Locally every chunk is hashed now; on the object store each chunk is checked as it streams in,
    and the listing (names and sizes) now. ``manifest``: the pack's, verified so already."""
    from streetvision.io.manifests import verify_dir

    uri = str(uri)
    if manifest is None:
        manifest = store.committed_manifest(uri, STEP) if store.is_s3(uri) else verify_dir(uri, STEP)
    samples = _small(uri, manifest, SAMPLES)
    indexes = {split: _small(uri, manifest, f"{split}/{LITDATA_INDEX}") for split in samples}
    for split, index in indexes.items():
        for chunk in index["chunks"]:
            name = f"{split}/{chunk['filename']}"
            if manifest.outputs.get(name, {}).get("sha256") != chunk.get("sha256"):
                raise ManifestError(f"{uri}: {name} is not the chunk its index.json lists")
            EXPECTED[store.join(uri, name)] = chunk["sha256"]
        EXPECTED[store.join(uri, split, LITDATA_INDEX)] = manifest.outputs[f"{split}/{LITDATA_INDEX}"][
            "sha256"
        ]
    return Pack(uri, manifest, samples, indexes)


# Object URI -> the SHA-256 its verified pack lists: what VerifyingS3Downloader checks each download
# against (DataLoader workers inherit it).
EXPECTED: dict[str, str] = {}


def verifying_downloader():
    """litdata's chunk downloader for ``s3://``, replaced by one that fetches through :mod:`store` (boto3,
    the ``AWS_*`` variables, ``http`` or ``https`` endpoints) and checks every object against the SHA-256
    of its verified pack before litdata sees it."""
    from litdata.streaming import downloader as dl

    class VerifyingS3Downloader(dl.Downloader):
        def download_file(self, remote_filepath: str, local_filepath: str) -> None:
            if os.path.exists(local_filepath):
                return
            expected = EXPECTED.get(remote_filepath)
            if expected is None:
                raise PackError(f"{remote_filepath}: not part of a verified pack")
            tmp = self._temp_download_path(local_filepath)
            try:
                written = store.download_file(remote_filepath, tmp)
                if written.sha256 != expected:
                    raise ManifestError(f"{remote_filepath}: sha256 differs from the pack's manifest")
                self._publish_file(tmp, local_filepath)
            finally:
                Path(tmp).unlink(missing_ok=True)

        def download_fileobj(self, remote_filepath: str, fileobj) -> None:
            raise PackError(f"{remote_filepath}: streamed packs are read whole-chunk, verified")

        async def adownload_fileobj(self, remote_filepath: str):
            raise PackError(f"{remote_filepath}: streamed packs are read whole-chunk, verified")

        async def adownload_file(self, remote_filepath: str, local_filepath: str) -> None:
            import asyncio

            await asyncio.to_thread(self.download_file, remote_filepath, local_filepath)
            self._notify_published(local_filepath)

        async def adownload_bytes(self, remote_filepath, offset, length, local_chunkpath) -> bytes:
            import asyncio

            return await asyncio.to_thread(
                self.download_bytes, remote_filepath, offset, length, local_chunkpath
            )

    dl.register_downloader("s3://", VerifyingS3Downloader, overwrite=True)
    return VerifyingS3Downloader


class Decode:
    """A packed sample -> (tensor, label, index in its split): the JPEG decoded at ``side`` (draft), then
    ``transform`` (a timm transform, or a challenge view then the transform); ``labelled=False``: the
    transformed image alone (self-supervised training never reads a label)."""

    def __init__(self, transform, side: int, labelled: bool = True):
        self.transform, self.side, self.labelled = transform, side, labelled
        self.share: tuple[int, int] | None = None  # (rank, world): decode every world-th sample only

    def __call__(self, item: dict):
        import torch

        from streetvision.data.images import load_rgb

        if self.share is not None and int(item["index"]) % self.share[1] != self.share[0]:
            return None  # another rank's: not decoded
        image = self.transform(load_rgb(io.BytesIO(item["image"]), self.side))
        if not self.labelled:
            return image
        return image, torch.tensor(float(item["label"])), int(item["index"])


class _Quiet:
    """Drops litdata's advice to cache 25 GB or more, which a bounded cache contradicts on purpose."""

    def filter(self, record) -> bool:
        return "less than 25GB" not in record.getMessage()


def rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (
        (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    )


def streamed(pack: Pack, split: str, decode, *, cache_dir: Path, cache_bytes: int, shuffle: bool = False,
             seed: int = 0, drop_last: bool | None = None, whole: bool = False):  # fmt: skip
    """A litdata ``StreamingDataset`` of one split of the pack: build it where the process group exists
    (a DataModule's dataloader hook), since it records the rank when it is constructed. ``whole``: every
    rank streams the whole split and keeps its share (evaluation, :class:`streetvision.models.data.Share`), instead of litdata's own
    division among ranks (training: equal counts per rank with ``drop_last``, by default in DDP)."""
    import logging

    from litdata import StreamingDataset
    from litdata.utilities.env import _DistributedEnv

    verifying_downloader()
    logging.getLogger("litdata.streaming.dataset").addFilter(_QUIET)
    cache_dir.mkdir(parents=True, exist_ok=True)
    dataset = StreamingDataset(
        pack.split_uri(split) if store.is_s3(pack.uri) else str(Path(pack.uri, split).resolve()),
        cache_dir=str(cache_dir),
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        max_cache_size=cache_bytes,
        transform=decode,
        # A full permutation inside each chunk (litdata's default shuffles blocks of 256 neighbours, which
        # keeps a small dataset's epochs close to storage order).
        item_shuffle_window="full",
    )
    dataset.cache_dir_sv, dataset.total_sv = cache_dir, len(pack.ids(split))  # for infer: release, the whole
    if not whole:
        return dataset
    rank, world = rank_and_world()
    dataset.distributed_env = _DistributedEnv(world_size=1, global_rank=0, num_nodes=1)
    decode.share = (rank, world)
    from streetvision.models.data import Share

    return Share(dataset, rank, world, len(pack.ids(split)))


_QUIET = _Quiet()


def clear_cache(cache_dir: Path) -> None:
    shutil.rmtree(cache_dir, ignore_errors=True)
