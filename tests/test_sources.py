"""Dataset sources: labels.csv, Hugging Face parquet shards and a folder per class are one dataset.

The same images and labels written the three ways (locally and on the real S3 server) have one index and
one content identity; parquet faults (a corrupt row group, a missing column, labels outside the mapping)
are one line and no commit; make_splits reads ids and labels only, never an image's bytes.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_line

from streetvision.data.dataset import DataError, SourceConfig, content_identity, fingerprint, load_index
from streetvision.io import store

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

NAMES = {0: "no_roadwork", 1: "roadwork"}


def _images(n: int = 24) -> list[tuple[str, int, bytes]]:
    """(id, label, JPEG bytes) of ``n`` small generated images, ids as a folder per class spells them."""
    from PIL import Image

    rows = []
    for i in range(n):
        label = i % 2
        buf = io.BytesIO()
        Image.new("RGB", (40 + i, 32), (10 * i % 255, 80 * label, 30)).save(buf, "JPEG")
        rows.append((f"{NAMES[label]}/img{i:03d}.jpg", label, buf.getvalue()))
    return rows


def write_csv(root: Path, rows, label_text=str) -> Path:
    for ident, _, data in rows:
        (root / ident).parent.mkdir(parents=True, exist_ok=True)
        (root / ident).write_bytes(data)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        w.writerows((ident, label_text(label)) for ident, label, _ in rows)
    return root


def write_folder(root: Path, rows) -> Path:
    for ident, _, data in rows:
        (root / ident).parent.mkdir(parents=True, exist_ok=True)
        (root / ident).write_bytes(data)
    return root


def write_parquet(
    root: Path, rows, *, shards: int = 2, group: int = 5, labels=None, columns=("image", "label")
):
    """Hugging Face's layout: ``data/train-0000k-of-0000n.parquet``, an image struct and a label column."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    per = -(-len(rows) // shards)
    for k in range(shards):
        part = rows[k * per : (k + 1) * per]
        table = pa.table({
            columns[0]: pa.array([{"bytes": data, "path": ident} for ident, _, data in part]),
            columns[1]: [labels(label) if labels else label for _, label, _ in part],
        })  # fmt: skip
        pq.write_table(table, root / "data" / f"train-{k:05d}-of-{shards:05d}.parquet", row_group_size=group)
    return root


@pytest.fixture(scope="module")
def three_ways(tmp_path_factory):
    rows = _images()
    root = tmp_path_factory.mktemp("three")
    return rows, {
        "csv": write_csv(root / "csv", rows),
        "imagefolder": write_folder(root / "folder", rows),
        "parquet": write_parquet(root / "parquet", rows),
    }


def test_one_dataset_written_three_ways_has_one_identity(three_ways):
    rows, roots = three_ways
    indexes = {fmt: load_index(root) for fmt, root in roots.items()}
    assert {fmt: ds.format for fmt, ds in indexes.items()} == {f: f for f in roots}
    assert len({ds.index_sha256 for ds in indexes.values()}) == 1
    assert sorted(indexes["parquet"].ids) == sorted(r[0] for r in rows)
    identities = {fmt: content_identity(root) for fmt, root in roots.items()}
    assert len(set(identities.values())) == 1, identities
    # One image's bytes changed in one layout: its identity moves, the index does not.
    edited = roots["imagefolder"].parent / "edited"
    shutil.copytree(roots["imagefolder"], edited)
    (edited / rows[3][0]).write_bytes(rows[4][2])
    assert load_index(edited).index_sha256 == indexes["csv"].index_sha256
    assert content_identity(edited) != identities["csv"]


def test_the_three_ways_on_the_object_store_match_the_local_ones(three_ways, s3):
    _, roots = three_ways
    local = content_identity(roots["csv"])
    for fmt, root in roots.items():
        uri = store.join(s3, fmt)
        store.upload_tree(root, uri)
        assert load_index(uri).format == fmt
        assert content_identity(uri) == local, fmt
        before = fingerprint(uri)
        assert fingerprint(uri) == before  # a listing: stable while nothing changes


def test_string_labels_and_other_columns_through_the_mapping(tmp_path):
    rows = _images(10)
    root = write_parquet(tmp_path / "p", rows, labels=lambda y: ["clear", "works"][y], columns=("jpg", "cls"))
    with pytest.raises(DataError, match="no column 'image'"):
        load_index(root)
    source = SourceConfig(image_column="jpg", label_column="cls", labels={"clear": 0, "works": 1})
    ds = load_index(root, source)
    assert ds.label_of() == {ident: label for ident, label, _ in rows}
    with pytest.raises(
        DataError, match=r"label outside source.labels: 10 \(data/train-00000-of-00002.parquet row 0"
    ):
        load_index(root, SourceConfig(image_column="jpg", label_column="cls"))


def test_a_folder_per_class_names_folders_outside_the_mapping(tmp_path):
    rows = _images(6)
    root = write_folder(tmp_path / "f", rows)
    (root / "cones").mkdir()
    shutil.copy(root / rows[0][0], root / "cones" / "x.jpg")
    shutil.copy(root / rows[0][0], root / "stray.jpg")
    (root / "README.md").write_text("a dataset card is not an image\n")
    with pytest.raises(DataError) as e:
        load_index(root)
    assert "image outside a class folder: 1 (stray.jpg)" in str(e.value)
    assert "class folder not in source.labels: 1 (cones/x.jpg)" in str(e.value)
    (root / "stray.jpg").unlink()
    ds = load_index(root, SourceConfig(labels={"no_roadwork": 0, "roadwork": 1, "cones": 1}))
    assert ds.label_of()["cones/x.jpg"] == 1 and len(ds.ids) == 7


def corrupt_row_group(path: Path, group: int, columns=None) -> None:
    """Overwrite the pages of one row group's column chunks (all, or the first ``columns``)."""
    meta = pq.ParquetFile(path).metadata.row_group(group)
    raw = bytearray(path.read_bytes())
    for c in range(columns or meta.num_columns):
        col = meta.column(c)
        start = col.dictionary_page_offset or col.data_page_offset  # the chunk starts at its dictionary
        size = col.total_compressed_size
        raw[start : start + size] = b"\xff" * size
    path.write_bytes(bytes(raw))


def _cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streetvision", *args], capture_output=True, text=True, env=env
    )


@pytest.mark.faults
@pytest.mark.parametrize("fault", ["row_group", "column", "label"])
def test_parquet_faults_are_one_line_and_no_commit(tmp_path, fault):
    rows = _images(20)
    if fault == "column":
        root = write_parquet(tmp_path / "p", rows, columns=("picture", "label"))
        expect = "no column 'image'"
    elif fault == "label":
        root = write_parquet(tmp_path / "p", rows, labels=lambda y: [0, 7][y])
        expect = "10 bad row(s); label outside source.labels: 10"
    else:
        root = write_parquet(tmp_path / "p", rows)
        corrupt_row_group(root / "data" / "train-00001-of-00002.parquet", 1)
        expect = "unreadable row group: 1 (data/train-00001-of-00002.parquet group 1"
    out = tmp_path / "splits"
    done = _cli("make-splits", "--dataset", str(root), "--out", str(out))
    assert done.returncode == 2 and one_line(done.stderr), done.stderr
    assert expect in done.stderr, done.stderr
    assert not out.exists()


def test_make_splits_reads_no_image_bytes(tmp_path):
    """Every image replaced by garbage: make_splits still succeeds (it reads ids and labels only)."""
    rows = [(ident, label, b"not an image") for ident, label, _ in _images(12)]
    root = write_parquet(tmp_path / "p", rows)
    done = _cli("make-splits", "--dataset", str(root), "--out", str(tmp_path / "splits"))
    assert done.returncode == 0, done.stderr
    manifest = (tmp_path / "splits" / "manifest.json").read_text()
    assert '"format": "parquet"' in manifest and "content_sha256" not in manifest
