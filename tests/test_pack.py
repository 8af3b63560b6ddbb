"""pack_shards and the streamed splits: what is packed, how it is read, and what reading refuses.

Against the real SeaweedFS (a plain ``http://`` endpoint): a pack written to ``s3://`` with no chunk ever
whole on local disk; two gloo ranks under torchrun streaming disjoint shares of the training split, with a
cache many times smaller than the split and its peak size measured; a tampered chunk refused as it
streams in. No training step downloads a dataset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PACK, one_line

from streetvision.data import packed
from streetvision.data.dataset import content_identity
from streetvision.io import store
from streetvision.io.manifests import ManifestError, verify_dir

HERE = Path(__file__).resolve().parent


def test_a_pack_holds_every_split_once_with_its_lineage(demo_dataset, demo_splits, demo_pack):
    m = verify_dir(demo_pack, "pack_shards")
    parts = json.loads((demo_splits / "splits.json").read_text())
    samples = json.loads((demo_pack / "samples.json").read_text())
    for split in ("train", "val_select", "val_calib", "val_test"):
        assert sorted(samples[split]["ids"]) == sorted(parts[split])
        index = json.loads((demo_pack / split / "index.json").read_text())
        assert len(index["chunks"]) >= 1
        for chunk in index["chunks"]:  # every chunk the index names is a listed output of that hash
            assert m.outputs[f"{split}/{chunk['filename']}"]["sha256"] == chunk["sha256"]
    assert len([n for n in m.outputs if n.startswith("train/chunk-")]) > 1  # small chunks: several
    assert m.inputs["dataset"]["content_sha256"] == content_identity(demo_dataset)
    assert m.inputs["splits"]["manifest_sha256"]
    assert m.metrics["images"] == 80 and m.metrics["bytes_per_image"] > 0


def test_packed_images_are_bounded_and_decoded_once(tmp_path):
    """A phone-sized JPEG is stored with its shorter side at max_side, EXIF orientation applied;
    max_side=0 keeps the original bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: displayed portrait
    Image.new("RGB", (2000, 1500), (200, 30, 30)).save(buf, "JPEG", exif=exif)
    sha, stored, _ = packed.prepare((buf.getvalue(), 512, 95))
    with Image.open(io.BytesIO(stored)) as im:
        assert im.size == (512, 683)  # portrait, shorter side 512
    assert packed.prepare((buf.getvalue(), 0, 95))[1] == buf.getvalue()
    square = io.BytesIO()  # the JPEG draft halves it to exactly max_side: still stored at max_side
    Image.new("RGB", (1024, 1024), (9, 90, 200)).save(square, "JPEG", quality=95)
    with Image.open(io.BytesIO(packed.prepare((square.getvalue(), 512, 95))[1])) as im:
        assert im.size == (512, 512)
    small = io.BytesIO()
    Image.new("RGB", (120, 90), (1, 2, 3)).save(small, "PNG")  # nothing to save: kept as it is served
    assert packed.prepare((small.getvalue(), 512, 95))[1] == small.getvalue()
    assert packed.prepare((b"not an image", 512, 95))[1] is None
    assert sha == __import__("hashlib").sha256(buf.getvalue()).hexdigest()


@pytest.mark.faults
def test_an_unreadable_image_is_one_line_and_no_pack(demo_dataset, demo_splits, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_dataset, data)
    first = sorted((data / "images").iterdir())[:2]
    first[0].write_bytes(first[0].read_bytes()[:200])
    first[1].write_bytes(b"garbage")
    # make_splits reads ids and labels only: these splits are still this dataset's
    out = tmp_path / "packed"
    r = subprocess.run([sys.executable, "-m", "streetvision", "pack-shards", "--dataset", str(data),
                        "--splits", str(demo_splits), "--out", str(out), *PACK],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and one_line(r.stderr), r.stderr
    assert "2 unreadable or truncated image(s)" in r.stderr and "nothing packed" in r.stderr
    assert not out.exists()


def test_no_training_step_copies_a_dataset_or_a_pack(world, monkeypatch, tmp_path):
    """The training steps read the pack where it is: a download of a dataset or of the pack fails here."""
    from conftest import GATE, TINY_TRAIN

    from streetvision.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError(f"a training step copied a whole tree: {args[:1]}")

    monkeypatch.setattr(store, "download_tree", refuse)
    monkeypatch.setattr(store, "local_tree", refuse)
    real = store.staged_step

    def staged(uri, step=None):
        assert step != "pack_shards", "the pack was downloaded"
        return real(uri, step)

    monkeypatch.setattr(store, "staged_step", staged)
    w = {k: str(v) for k, v in world.items()}
    assert main(["train-baseline", "--shards", w["shards"], "--out", str(tmp_path / "b"), *TINY_TRAIN,
                 "trainer.max_epochs=1", "eval.challenge_views=1"]) == 0  # fmt: skip
    assert main(["train-gate", "--baseline", w["baseline"], "--shards", w["shards"], "--out",
                 str(tmp_path / "g"), *GATE, "trainer.max_epochs=1"]) == 0  # fmt: skip


@pytest.fixture(scope="module")
def big_pack(s3_server, tmp_path_factory):
    """2,000 small images packed straight to the object store (dataset local, output s3://)."""
    from streetvision.data.demo import write_demo_dataset
    from streetvision.steps import make_splits

    root = tmp_path_factory.mktemp("big")
    data = write_demo_dataset(root / "data", n=2000, seed=3, size=32)
    from streetvision.config import load_config

    make_splits.run(load_config(make_splits.Config), dataset=data, out=root / "splits")
    env = {**os.environ, **s3_server.env()}
    uri = f"s3://{s3_server.bucket}/big-{os.getpid()}"
    r = subprocess.run([sys.executable, "-m", "streetvision", "pack-shards", "--dataset", str(data), "--splits",
                        str(root / "splits"), "--out", uri, "pack.chunk_bytes=65536", "pack.max_side=0"],
                       capture_output=True, text=True, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return uri, env


@pytest.mark.slow  # two ranks under torchrun and a 2,000-image pack: half a minute
def test_two_ranks_stream_disjoint_shares_through_a_cache_20x_smaller(big_pack, tmp_path):
    uri, env = big_pack
    manifest_sizes = store_sizes(uri, env)
    train_bytes = sum(size for name, size in manifest_sizes.items() if name.startswith("train/chunk-"))
    chunk = max(size for name, size in manifest_sizes.items() if name.startswith("train/chunk-"))
    cache = train_bytes // 20
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), str(HERE / "stream_ranks.py"), uri, str(tmp_path),
                        str(cache)], capture_output=True, text=True,
                       env={**env, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)},
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    n = len(ranks[0]["ids"])
    for epoch in (0, 1):
        a, b = (set(rk["epochs"][epoch]) for rk in ranks)
        assert len(a) == len(ranks[0]["epochs"][epoch]) and len(b) == len(ranks[1]["epochs"][epoch])
        assert not a & b  # disjoint
        assert len(a) == len(b)  # equal shares: no rank waits on another
        # drop_last leaves out less than a batch per rank, and nothing is seen twice
        assert n - 2 * 4 < len(a | b) <= n
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # a new order every epoch
    for rk in ranks:  # the cache stays within its bound plus the chunks in flight
        assert rk["peak_cache_bytes"] <= cache + 3 * chunk, (rk["peak_cache_bytes"], cache, chunk)
    print(f"train split {train_bytes} bytes, cache {cache} bytes ({train_bytes / cache:.0f}x smaller), chunk "
          f"{chunk} bytes; peak cache {[rk['peak_cache_bytes'] for rk in ranks]} bytes")  # fmt: skip


def test_a_chunk_changed_on_the_object_store_is_refused_as_it_streams_in(demo_pack, s3, tmp_path):
    copy = f"{s3}/copy"
    store.upload_dir(demo_pack, copy)  # a committed pack on the object store, manifest last
    index = json.loads(store.read_bytes(store.join(copy, "val_test", "index.json")))
    name = f"val_test/{index['chunks'][0]['filename']}"
    data = bytearray(store.read_bytes(store.join(copy, name)))
    data[-1] ^= 0xFF  # same size: only the content hash can tell
    store.write_bytes(store.join(copy, name), bytes(data))
    pack_ = packed.open_pack(copy)  # the manifest and the listing are intact
    stream = packed.streamed(pack_, "val_test", packed.Decode(lambda im: 0, 16), cache_dir=tmp_path / "c",
                             cache_bytes=10**7)  # fmt: skip
    with pytest.raises(Exception) as e:
        list(stream)
    assert isinstance(e.value, ManifestError) or "sha256 differs" in str(e.value), e.value
    assert "sha256 differs from the pack's manifest" in str(e.value)


def store_sizes(uri: str, env: dict) -> dict[str, int]:
    keep = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    store.reset_clients()
    try:
        return {name: size for name, (size, _) in store.list_objects(uri).items()}
    finally:
        for k, v in keep.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        store.reset_clients()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_pack_on_the_object_store_matches_the_local_one(demo_dataset, demo_splits, demo_pack, s3):
    """Packed from s3:// to s3://: the same chunks, byte for byte, as packing the local copy."""
    store.upload_tree(demo_dataset, f"{s3}/data")
    store.upload_dir(demo_splits, f"{s3}/splits")
    r = subprocess.run([sys.executable, "-m", "streetvision", "pack-shards", "--dataset", f"{s3}/data",
                        "--splits", f"{s3}/splits", "--out", f"{s3}/shards", *PACK],
                       capture_output=True, text=True, env=dict(os.environ))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    remote = store.committed_manifest(f"{s3}/shards", "pack_shards")
    local = verify_dir(demo_pack)
    chunks = {n: o["sha256"] for n, o in local.outputs.items() if "/chunk-" in n}
    assert {n: remote.outputs[n]["sha256"] for n in chunks} == chunks
    assert remote.inputs["dataset"]["content_sha256"] == local.inputs["dataset"]["content_sha256"]
    assert np.isfinite(remote.metrics["images_per_s"])
