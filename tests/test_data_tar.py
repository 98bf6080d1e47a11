"""Our byte-offset tar reader against tarfile on the same bytes: ustar, PAX and GNU headers,
cut and bad data; and shards written by other tools, checked, indexed and loaded."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import webdataset

from t2t_dist.config import DataConfig
from t2t_dist.data import build_train_loader, check_shards, load_shard_table, write_shards
from t2t_dist.data.tar import TarIndex, parse_tar_samples, split_member

LONG = "n" * 120  # a key longer than ustar's 100-byte name field


def _samples(count: int, *, long_keys: bool = False) -> list[dict]:
    return [{"__key__": (f"{LONG}_{i}" if long_keys and i % 2 else f"dir/s{i:03d}"),
             "jpg": bytes([i]) * (700 + 300 * i), "cls": str(i).encode(),
             "json": json.dumps({"label": i}).encode()} for i in range(count)]


def _webdataset_tar(samples: list[dict], **writer_args) -> bytes:
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer, encoder=False, **writer_args) as writer:
        for sample in samples:
            writer.write(sample)
    return buffer.getvalue()


def _gnu_tar(samples: list[dict]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for sample in samples:
            for extension in ("cls", "jpg", "json"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{extension}")
                info.size = len(sample[extension])
                tar.addfile(info, io.BytesIO(sample[extension]))
    return buffer.getvalue()


def _tarfile_offsets(data: bytes) -> list[int]:
    """What the manifest should hold, by tarfile: each key's first header, then the data end."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    starts, seen = [], None
    for member in members:
        key, _ = split_member(member.name)
        if key != seen:
            starts.append(member.offset)
            seen = key
    last = members[-1]
    return starts + [last.offset_data + -(-last.size // 512) * 512]


def _fields(samples: list[dict]) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__key__"} for s in samples]


TARS = {
    "ustar (mtime=0)": lambda s: _webdataset_tar(s, mtime=0),
    "PAX (webdataset's default mtime)": lambda s: _webdataset_tar(s),
    "PAX long names": lambda s: _webdataset_tar(_samples(len(s), long_keys=True), mtime=0),
    "GNU long names": lambda s: _gnu_tar(_samples(len(s), long_keys=True)),
}


@pytest.mark.parametrize("kind", TARS)
def test_parse_and_index_match_tarfile(kind):
    samples = _samples(5)
    data = TARS[kind](samples)
    assert parse_tar_samples(data) == _fields(samples)
    expected = _tarfile_offsets(data)
    for chunk in (1, 511, 4096, len(data)):  # streamed in any chunk size
        index = TarIndex()
        for start in range(0, len(data), chunk):
            index.feed(data[start:start + chunk])
        assert index.ended and index.offsets() == expected
    # A Range read of samples 1..3 by those offsets parses to exactly those samples.
    assert parse_tar_samples(data[expected[1]:expected[4]]) == _fields(samples)[1:4]


def test_writer_shards_have_plain_ustar_headers(image_tree, tmp_path):
    """write_shards sets TarWriter's mtime: its default (a float) adds a PAX header to every
    member, which sends every range read to tarfile instead of the fast path."""
    write_shards(image_tree(6, classes=2), tmp_path / "out", prefix="u", processes=1)
    data = (tmp_path / "out" / "u-0000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        headers = [data[m.offset:m.offset + 512] for m in tar.getmembers()]
    assert len(headers) == 18
    assert all(h[156:157] == b"0" and h[257:262] == b"ustar" for h in headers)
    assert _webdataset_tar(_samples(1))[156:157] == b"x"  # the default really writes PAX


def test_bad_and_cut_tars_are_errors():
    data = _webdataset_tar(_samples(4), mtime=0)
    offsets = _tarfile_offsets(data)
    flipped = bytearray(data)
    flipped[offsets[2] + 3] ^= 0xFF  # a bit of the third sample's first member name
    with pytest.raises(tarfile.ReadError, match="bad tar header checksum at byte"):
        parse_tar_samples(bytes(flipped))
    with pytest.raises(tarfile.ReadError, match="ends past the data"):
        parse_tar_samples(data[:offsets[1] + 1700])
    garbage = bytearray(data)
    garbage[offsets[2]:offsets[2] + 512] = b"\x07" * 512  # no header at all
    # tarfile (the fallback for what is not plain ustar) takes a bad header after the first
    # member for the end of the archive: the loader counts the missing samples as truncated.
    assert parse_tar_samples(bytes(garbage)) == _fields(_samples(2))
    # The index does not, and it knows a stream that stops inside a header or member.
    for cut, where in ((flipped, "checksum"), (garbage, "no tar header"),
                       (data[:offsets[1] + 100], "inside a header"),
                       (data[:offsets[1] + 1700], "inside a member")):
        index = TarIndex()
        index.feed(bytes(cut))
        with pytest.raises(tarfile.ReadError, match=where):
            index.offsets()


def test_check_reports_a_bad_header_that_tarfile_would_skip(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    data = bytearray(_webdataset_tar(_samples(4), mtime=0))
    third = _tarfile_offsets(bytes(data))[2]
    data[third + 20] ^= 0xFF  # a flipped bit in the third sample's first header
    (folder / "x-0000.tar").write_bytes(bytes(data))
    report = check_shards(str(folder / "x-0000.tar"))
    (shard,) = report.shards
    assert shard.error == f"truncated: bad tar header checksum at byte {third}"
    # The second sample is left out too: the bad header might have been one of its members.
    assert shard.samples == 1 and not report.ok


def test_foreign_pax_shards_get_a_manifest_and_load(tmp_path):
    """Shards written elsewhere (webdataset defaults: PAX headers; labels only in json)."""
    folder = tmp_path / "foreign"
    folder.mkdir()
    samples = [{**s, "jpg": _jpeg(i)} for i, s in enumerate(_samples(12))]
    for s in samples:
        del s["cls"]
    for shard in range(3):
        (folder / f"wds-{shard:04d}.tar").write_bytes(_webdataset_tar(samples[shard * 4:shard * 4 + 4]))
    pattern = f"{folder}/wds-{{0000..0002}}.tar"
    with pytest.raises(FileNotFoundError, match="--write-manifest"):
        load_shard_table(pattern)
    report = check_shards(pattern, write_manifest=True)
    assert report.ok and report.samples == 12
    table = load_shard_table(pattern)
    expected = [_tarfile_offsets((folder / f"wds-{i:04d}.tar").read_bytes()) for i in range(3)]
    assert [o.tolist() for o in table.offsets] == expected
    config = DataConfig(train_urls=pattern, loader_workers=0, shard_interleave=2)
    loader = build_train_loader(config, img_size=8, micro_batch=4)
    labels = sorted(x for _, batch in loader for x in batch.tolist())
    assert labels == list(range(12)) and sum(loader.skipped().values()) == 0


def _jpeg(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()
