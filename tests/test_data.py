"""Dataset contract, demo data, image decoding and splits."""

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from streetvision.config import load_config
from streetvision.data.dataset import DataError, content_identity, load_index, with_content
from streetvision.data.demo import write_demo_dataset
from streetvision.data.images import load_rgb
from streetvision.data.splits import SplitError, stratified_split
from streetvision.io.manifests import MANIFEST, verify_dir
from streetvision.steps import make_splits


def cli(*args):
    return subprocess.run([sys.executable, "-m", "streetvision", *args], capture_output=True, text=True)


def test_demo_data_is_deterministic_byte_for_byte(tmp_path):
    a = write_demo_dataset(tmp_path / "a", n=10, seed=3, size=48)
    b = write_demo_dataset(tmp_path / "b", n=10, seed=3, size=48)
    c = write_demo_dataset(tmp_path / "c", n=10, seed=4, size=48)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 11
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files)


def test_demo_data_is_balanced_and_valid(demo_dataset):
    ds = load_index(demo_dataset)
    assert len(ds.ids) == 80 and ds.labels.sum() == 40


@pytest.fixture
def dataset_copy(demo_dataset, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(demo_dataset, dst)
    return dst


def rewrite_index(root, rows):
    (root / "labels.csv").write_text("image,label\n" + "".join(f"{a},{b}\n" for a, b in rows))


def rows_of(root):
    return [line.split(",") for line in (root / "labels.csv").read_text().split()[1:]]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda r, rows: rewrite_index(r, rows + [("images/nope.jpg", "1")]),
            "missing file: 1 (images/nope.jpg)",
        ),
        (
            lambda r, rows: rewrite_index(r, [(rows[0][0], "2"), *rows[1:]]),
            "label outside source.labels: 1 (line 2 ('2'))",
        ),
        (lambda r, rows: rewrite_index(r, rows + [rows[0]]), "duplicate id: 1"),
        (lambda r, rows: rewrite_index(r, []), "empty index"),
        (
            lambda r, rows: rewrite_index(r, rows + [("../outside.jpg", "0")]),
            "path escaping the dataset root",
        ),
        (lambda r, rows: rewrite_index(r, rows + [("/etc/hostname", "0")]), "path escaping the dataset root"),
    ],
)
def test_bad_index_gives_one_clear_error(dataset_copy, mutate, message):
    mutate(dataset_copy, rows_of(dataset_copy))
    with pytest.raises(DataError) as err:
        load_index(dataset_copy)
    assert message in str(err.value)


def test_truncated_and_unreadable_images_are_named_with_their_count(dataset_copy):
    names = [r[0] for r in rows_of(dataset_copy)]
    data = (dataset_copy / names[0]).read_bytes()
    (dataset_copy / names[0]).write_bytes(data[: len(data) // 2])
    (dataset_copy / names[1]).write_bytes(b"not an image at all")
    load_index(dataset_copy)  # the index alone is read: make_splits never decodes an image
    with pytest.raises(DataError, match=r"unreadable or truncated image: 2 \(" + names[0]):
        with_content(load_index(dataset_copy))


def test_symlink_leaving_the_dataset_is_rejected(dataset_copy, tmp_path):
    outside = tmp_path / "outside.jpg"
    shutil.copy(dataset_copy / rows_of(dataset_copy)[0][0], outside)
    (dataset_copy / "images" / "link.jpg").symlink_to(outside)
    rewrite_index(dataset_copy, rows_of(dataset_copy) + [("images/link.jpg", "1")])
    with pytest.raises(DataError, match="path escaping"):
        load_index(dataset_copy)


@pytest.mark.parametrize("spelling", ["./{}", "{d}//{f}", "{d}/./{f}", "link"])
def test_one_image_listed_under_two_spellings_is_refused_as_a_duplicate(dataset_copy, spelling):
    rows = rows_of(dataset_copy)
    first = rows[0][0]
    folder, file = first.rsplit("/", 1)
    if spelling == "link":
        (dataset_copy / folder / "alias.jpg").symlink_to(file)
        alias = f"{folder}/alias.jpg"
    else:
        alias = spelling.format(first, d=folder, f=file)
    rewrite_index(dataset_copy, rows + [(alias, "0" if rows[0][1] == "1" else "1")])
    with pytest.raises(
        DataError, match=rf"duplicate id: 1 \(line {len(rows) + 2} \({first} as '{alias}'\)\)"
    ):
        load_index(dataset_copy)


def test_an_image_is_known_by_its_normal_spelling_and_the_identity_follows_the_files(dataset_copy):
    before = load_index(dataset_copy)
    content_identity_before = content_identity(dataset_copy)
    rows = rows_of(dataset_copy)
    rewrite_index(dataset_copy, [(f"./{rows[0][0]}", rows[0][1]), *rows[1:]])
    after = load_index(dataset_copy)
    assert after.ids == before.ids  # one id, however the index spells it ...
    assert after.index_sha256 == before.index_sha256  # ... so one identity: ids and labels, not bytes
    assert content_identity(dataset_copy) == content_identity_before
    (dataset_copy / rows[1][0]).write_bytes((dataset_copy / rows[2][0]).read_bytes())
    assert content_identity(dataset_copy) != content_identity_before  # an image's bytes changed


def test_a_nul_byte_in_an_image_path_is_a_bad_row(dataset_copy):
    rewrite_index(dataset_copy, rows_of(dataset_copy) + [("images/a\x00.jpg", "1")])
    with pytest.raises(DataError, match="path escaping the dataset root: 1"):
        load_index(dataset_copy)


@pytest.mark.parametrize(
    "content,says",
    [
        ("image,label\nimages/a.jpg\x00,1\n", "path escaping the dataset root: 1"),
        ("image,label\n" + "a" * 200_000 + ",1\n", "not a CSV index (line 1: field larger than field limit"),
    ],
)
def test_an_index_with_a_nul_byte_or_a_huge_field_is_one_clear_error(dataset_copy, content, says):
    (dataset_copy / "labels.csv").write_text(content)
    with pytest.raises(DataError) as err:
        load_index(dataset_copy)
    assert says in str(err.value)


def test_make_splits_on_bad_input_exits_nonzero_and_writes_nothing(dataset_copy, tmp_path):
    rewrite_index(dataset_copy, rows_of(dataset_copy) + [("images/gone.jpg", "1")])
    r = cli("make-splits", "--dataset", str(dataset_copy), "--out", str(tmp_path / "out"))
    assert r.returncode != 0
    assert "missing file" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_splits_are_stratified_disjoint_covering_and_within_one_per_class(demo_dataset, demo_splits):
    verify_dir(demo_splits)
    data = json.loads((demo_splits / "splits.json").read_text())
    ds = load_index(demo_dataset)
    label = ds.label_of()
    names = ["train", "val_select", "val_calib", "val_test"]
    all_ids = [i for n in names for i in data[n]]
    assert len(all_ids) == len(set(all_ids)) == len(ds.ids)
    for n in names:
        for cls in (0, 1):
            got = sum(1 for i in data[n] if label[i] == cls)
            assert abs(got - data["ratios"][n] * 40) <= 1


@pytest.mark.parametrize("seed", range(20))
def test_split_ratios_hold_for_awkward_sizes(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    labels = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(int)
    if min(labels.sum(), n - labels.sum()) < 10:
        labels[:10], labels[10:20] = 1, 0
    ids = [f"i{k}" for k in range(n)]
    ratios = [0.6, 0.15, 0.15, 0.1]
    parts = stratified_split(ids, labels, ratios, seed)
    assert sorted(i for p in parts.values() for i in p) == sorted(ids)
    for name, ratio in zip(parts, ratios, strict=True):
        for cls in (0, 1):
            members = {i for i, lab in zip(ids, labels, strict=True) if lab == cls}
            assert abs(len(members & set(parts[name])) - ratio * len(members)) <= 1


def test_a_split_without_both_classes_fails_saying_why():
    ids = [f"i{k}" for k in range(30)]
    labels = np.array([1] * 3 + [0] * 27)
    with pytest.raises(SplitError, match="needs both classes"):
        stratified_split(ids, labels, [0.6, 0.15, 0.15, 0.1], 0)


def test_split_seed_and_ratios_come_from_config_overrides(demo_dataset, tmp_path):
    cfg = load_config(make_splits.Config, [], ["splits.seed=5", "splits.ratios=[0.5,0.2,0.2,0.1]"])
    make_splits.run(cfg, dataset=demo_dataset, out=tmp_path / "s")
    data = json.loads((tmp_path / "s" / "splits.json").read_text())
    assert data["seed"] == 5 and data["ratios"]["train"] == 0.5 and len(data["train"]) == 40


def jpeg_bytes(size, orientation=None):
    img = Image.new("RGB", size, (200, 10, 10))
    img.paste((10, 10, 200), (0, 0, size[0] // 2, size[1]))  # left half blue
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_large_jpeg_is_decoded_at_reduced_size_but_not_below_the_need(tmp_path):
    p = tmp_path / "big.jpg"
    p.write_bytes(jpeg_bytes((4032, 3024)))
    img = load_rgb(p, min_side=240)
    assert img.size == (504, 378)  # 1/8 scale: both sides stay >= 240
    assert min(load_rgb(p, min_side=500).size) >= 500


def test_exif_orientation_is_honoured(tmp_path):
    p = tmp_path / "rot.jpg"
    p.write_bytes(jpeg_bytes((64, 32), orientation=6))  # rotate 90 degrees clockwise on display
    img = load_rgb(p)
    assert img.size == (32, 64)
    top = np.asarray(img)[2, 16]
    assert top[2] > 150 and top[0] < 80  # the blue left half is now on top


def test_fingerprint_follows_content_rewritten_in_place_locally_and_on_s3(s3, tmp_path):
    from streetvision.data.dataset import fingerprint
    from streetvision.data.demo import write_demo
    from streetvision.io import store

    local = write_demo_dataset(tmp_path / "d", n=10, seed=3, size=48)
    write_demo(s3, n=10, seed=3, size=48)
    before = {"local": fingerprint(local), "s3": fingerprint(s3)}
    assert fingerprint(local) == before["local"] and fingerprint(s3) == before["s3"]  # stable
    first = sorted((local / "images").iterdir())[0]
    first.write_bytes(sorted((local / "images").iterdir())[1].read_bytes())  # same name, other pixels
    store.upload_file(first, store.join(s3, f"images/{first.name}"))
    assert fingerprint(local) != before["local"] and fingerprint(s3) != before["s3"]
    out = tmp_path / "kfp" / "outputs" / "fingerprint"
    r = subprocess.run([sys.executable, "-m", "streetvision", "fingerprint", "--dataset", s3, "--output-file",
                        str(out)], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert out.read_text() == r.stdout.strip() == fingerprint(s3)
    r = subprocess.run([sys.executable, "-m", "streetvision", "fingerprint", "--dataset", str(tmp_path / "nope")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "not a directory" in r.stderr
