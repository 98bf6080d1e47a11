"""Shard writer layout, manifest, URL expansion and the checker (local and S3)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from t2t_dist.data import check_shards, expand_urls, load_shard_table, manifest_pattern, write_shards
from t2t_dist.data.urls import manifest_url, shard_pattern
from t2t_dist.storage import open_store


def _members(path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


def test_writer_layout_and_manifest(image_tree, tmp_path):
    src = image_tree(23, classes=3)
    manifest = write_shards(src, tmp_path / "out", prefix="toy-train", samples_per_shard=10,
                            processes=2, shuffle_seed=1)
    assert manifest["num_samples"] == 23 and manifest["classes"] == ["c0000", "c0001", "c0002"]
    assert [s["samples"] for s in manifest["shards"]] == [10, 10, 3]
    assert [s["name"] for s in manifest["shards"]] == [f"toy-train-000{i}.tar" for i in range(3)]
    on_disk = json.loads((tmp_path / "out" / "toy-train.manifest.json").read_text())
    assert on_disk == manifest
    labels_seen = []
    for entry in manifest["shards"]:
        path = tmp_path / "out" / entry["name"]
        names = _members(path)
        keys = sorted({n.split(".")[0] for n in names})
        assert len(keys) == entry["samples"]
        assert sorted(names) == sorted(f"{k}.{ext}" for k in keys for ext in ("jpg", "cls", "json"))
        data = path.read_bytes()
        assert entry["bytes"] == len(data)
        # Every recorded offset starts a sample's first header; the last is the end of the data.
        offsets = entry["offsets"]
        assert len(offsets) == entry["samples"] + 1 and offsets[-1] <= len(data)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            firsts = [m.offset for m in tar.getmembers()][::3]
            for member in tar.getmembers():
                if member.name.endswith(".cls"):
                    label = int(tar.extractfile(member).read())
                    meta = json.loads(tar.extractfile(member.name[:-3] + "json").read())
                    assert meta["label"] == label and meta["class"] == f"c{label:04d}"
                    labels_seen.append(label)
        assert firsts == offsets[:-1]
    assert sorted(labels_seen) == sorted(i % 3 for i in range(23))
    # Shuffled across shards: the first shard is not one class in file order.
    assert len(set(labels_seen[:10])) > 1
    assert manifest_pattern(str(tmp_path / "out"), manifest).endswith("toy-train-{0000..0002}.tar")


def test_writer_pre_resize(image_tree, tmp_path):
    from PIL import Image

    src = image_tree(4, side=40, classes=2)
    write_shards(src, tmp_path / "out", prefix="small", samples_per_shard=4, max_side=16, processes=1)
    with tarfile.open(tmp_path / "out" / "small-0000.tar") as tar:
        jpgs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert all(min(Image.open(io.BytesIO(j)).size) == 16 for j in jpgs)


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_shards(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no images"):
        write_shards(tmp_path / "empty", tmp_path / "out")


def test_url_expansion_local(tmp_path):
    for i in range(3):
        (tmp_path / f"x-{i:04d}.tar").write_bytes(b"")
    brace = f"{tmp_path}/x-{{0000..0002}}.tar"
    assert expand_urls(brace) == [f"{tmp_path}/x-{i:04d}.tar" for i in range(3)]
    assert expand_urls(f"{tmp_path}/x-*.tar") == expand_urls(brace)
    assert expand_urls(f"{tmp_path}/x-0000.tar::{tmp_path}/x-000[12].tar") == expand_urls(brace)
    with pytest.raises(ValueError, match="matched no shards"):
        expand_urls(f"{tmp_path}/y-*.tar")
    assert shard_pattern("s3://b/p", "x", 3) == "s3://b/p/x-{0000..0002}.tar"
    assert manifest_url("s3://b/p/x-0001.tar") == "s3://b/p/x.manifest.json"


@pytest.mark.s3
def test_url_expansion_s3(s3_bucket):
    store = open_store(s3_bucket + "/train")
    for name in ("a-0000.tar", "a-0001.tar", "b-0000.tar", "sub/a-0002.tar"):
        store.put(name, b"x")
    assert expand_urls(s3_bucket + "/train/a-*.tar") == [s3_bucket + "/train/a-0000.tar",
                                                         s3_bucket + "/train/a-0001.tar"]
    assert expand_urls(s3_bucket + "/train/?-0000.tar") == [s3_bucket + "/train/a-0000.tar",
                                                            s3_bucket + "/train/b-0000.tar"]
    assert expand_urls(s3_bucket + "/train/a-{0000..0001}.tar") == expand_urls(
        s3_bucket + "/train/a-*.tar")


def test_check_reports_corrupt_unlabeled_truncated_missing(image_tree, tmp_path, patch_member):
    src = image_tree(12, classes=4)
    out = tmp_path / "out"
    manifest = write_shards(src, out, prefix="t", samples_per_shard=4, processes=1)
    pattern = manifest_pattern(str(out), manifest)
    assert check_shards(pattern).ok
    first = out / "t-0000.tar"
    names = _members(first)
    jpgs, labels = [n for n in names if n.endswith(".jpg")], [n for n in names if n.endswith(".cls")]
    data = patch_member(first.read_bytes(), jpgs[0], lambda old: b"\0" * len(old))
    data = patch_member(data, labels[1], lambda old: b"x" * len(old))
    first.write_bytes(data)
    second = out / "t-0001.tar"
    second.write_bytes(second.read_bytes()[:1500])
    (out / "t-0002.tar").unlink()
    report = check_shards(pattern)
    assert not report.ok
    assert (report.corrupt, report.unlabeled) == (1, 1)
    assert [s.error.split(":")[0] for s in report.shards] == ["", "truncated", "missing"]
    text = str(report)
    assert "PROBLEMS" in text and "t-0002.tar" in text


@pytest.mark.s3
def test_write_to_s3_and_check_writes_manifest_for_foreign_shards(image_tree, s3_bucket):
    src = image_tree(9, classes=3)
    dest = s3_bucket + "/data"
    manifest = write_shards(src, dest, prefix="s", samples_per_shard=4, processes=2)
    pattern = manifest_pattern(dest, manifest)
    report = check_shards(pattern)
    assert report.ok and report.samples == 9 and len(report.labels) == 3
    # Shards without our manifest (e.g. the public imagenet-1k-wds): check writes one.
    store = open_store(dest)
    written = load_shard_table(pattern)
    store.delete("s.manifest.json")
    with pytest.raises(FileNotFoundError, match=r"run `t2t-dist shards check 's3://.*/data/s-\*\.tar' "
                                                r"--write-manifest`"):
        load_shard_table(pattern)
    check_shards(pattern, write_manifest=True)
    rebuilt = load_shard_table(pattern)
    assert rebuilt.sizes.tolist() == written.sizes.tolist()
    assert [o.tolist() for o in rebuilt.offsets] == [o.tolist() for o in written.offsets]


def test_digits_demo_dataset(tmp_path):
    from t2t_dist.data import make_digits_dataset

    patterns = make_digits_dataset(str(tmp_path / "digits"), img_size=16, samples_per_shard=500)
    assert patterns["train"].endswith("train/digits-train-{0000..0002}.tar")
    train, val = load_shard_table(patterns["train"]), load_shard_table(patterns["val"])
    assert train.num_samples + val.num_samples == 1797 and val.num_samples == 299
    assert train.classes == tuple(str(d) for d in range(10))
    report = check_shards(patterns["val"])
    assert report.ok and len(report.labels) == 10  # stratified: every digit in val


def test_encode_image_keeps_rgb_and_gray_jpegs_reencodes_the_rest(tmp_path):
    from PIL import Image

    from t2t_dist.data.writer import encode_image

    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 4), dtype=np.uint8)
    files = {"rgb.jpg": ("RGB", "JPEG"), "gray.jpg": ("L", "JPEG"), "cmyk.jpg": ("CMYK", "JPEG"),
             "png.jpg": ("RGBA", "PNG")}
    for name, (mode, fmt) in files.items():
        channels = {"RGB": 3, "L": 1, "CMYK": 4, "RGBA": 4}[mode]
        Image.fromarray(pixels[..., :channels].squeeze(), mode).save(tmp_path / name, format=fmt)
    for name, (mode, _) in files.items():
        jpeg, width, height = encode_image(str(tmp_path / name), None)
        assert (width, height) == (30, 20)
        kept = jpeg == (tmp_path / name).read_bytes()
        assert kept == (mode in ("RGB", "L")), name  # as-is: no second JPEG loss
        with Image.open(io.BytesIO(jpeg)) as image:
            assert image.format == "JPEG" and image.mode == ("L" if mode == "L" else "RGB")
    whole = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(OSError):
        encode_image(str(tmp_path / "cut.jpg"), None)


def test_check_progress_and_shard_missing_from_manifest(image_tree, tmp_path):
    out = tmp_path / "out"
    write_shards(image_tree(10, classes=2), out, prefix="m", samples_per_shard=4, processes=1)
    (out / "m-0003.tar").write_bytes((out / "m-0002.tar").read_bytes())  # a shard not listed

    class Counting:
        total, n = None, 0

        def update(self, n):
            self.n += n

    progress = Counting()
    report = check_shards(f"{out}/m-{{0000..0003}}.tar", progress=progress)
    assert (progress.total, progress.n) == (10, 12)  # the manifest's 10, the extra shard's 2
    assert [s.error for s in report.shards] == ["", "", "", "not in the manifest (3 shards)"]
