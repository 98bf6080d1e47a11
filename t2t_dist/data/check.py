"""Read shards back and report what is in them: ``t2t-dist shards check URL_PATTERN``."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

from t2t_dist.data.shards import (MANIFEST_FORMAT, iter_tar_samples, read_manifest, sample_image,
                                  sample_label)
from t2t_dist.data.urls import MANIFEST_SUFFIX, expand_urls, manifest_url, shard_prefix
from t2t_dist.storage import split_url


@dataclass
class ShardCheck:
    url: str
    samples: int = 0
    corrupt: int = 0  # image missing or not decodable
    unlabeled: int = 0
    error: str = ""  # "missing", "truncated: ..." or "manifest says N samples"
    offsets: list[int] = field(default_factory=list)  # each sample's first header offset


@dataclass
class ShardReport:
    """What ``check_shards`` found; ``str(report)`` is a printable table."""

    pattern: str
    shards: list[ShardCheck]
    labels: Counter
    num_classes: int | None  # from the manifest, when there is one

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def corrupt(self) -> int:
        return sum(s.corrupt for s in self.shards)

    @property
    def unlabeled(self) -> int:
        return sum(s.unlabeled for s in self.shards)

    @property
    def bad_shards(self) -> list[ShardCheck]:
        return [s for s in self.shards if s.error]

    @property
    def ok(self) -> bool:
        return not (self.corrupt or self.unlabeled or self.bad_shards)

    def __str__(self) -> str:
        lines = [f"{'shard':<48} {'samples':>8} {'corrupt':>8} {'unlabeled':>9}  problem"]
        for shard in self.shards:
            name = shard.url if len(shard.url) <= 48 else "..." + shard.url[-45:]
            lines.append(f"{name:<48} {shard.samples:>8} {shard.corrupt:>8} {shard.unlabeled:>9}  "
                         f"{shard.error}")
        classes = f"{len(self.labels)} classes seen"
        if self.num_classes is not None:
            classes += f" of {self.num_classes} in the manifest"
        lines.append(f"total: {len(self.shards)} shards, {self.samples} samples, {classes}, "
                     f"{self.corrupt} corrupt, {self.unlabeled} unlabeled, "
                     f"{len(self.bad_shards)} bad shards -> {'OK' if self.ok else 'PROBLEMS'}")
        return "\n".join(lines)


def _image_ok(data: bytes | None) -> bool:
    if data is None:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (64, 64))  # decode at 1/8 scale: catches truncation, 8x cheaper
            image.load()
        return True
    except Exception:
        return False


def check_shard(url: str, labels: Counter) -> ShardCheck:
    """Stream one shard start to end, decoding every image."""
    check = ShardCheck(url)
    store, name = split_url(url)
    try:
        with store.open_read(name) as stream:
            for _, fields, start in iter_tar_samples(stream):
                check.samples += 1
                check.offsets.append(start)
                check.corrupt += not _image_ok(sample_image(fields))
                label = sample_label(fields)
                if label is None:
                    check.unlabeled += 1
                else:
                    labels[label] += 1
    except FileNotFoundError:
        check.error = "missing"
    except (tarfile.TarError, EOFError, OSError) as error:
        check.error = f"truncated: {error}"
    return check


def _data_end(url: str, starts: list[int]) -> int:
    """Where the last sample's data ends (its last member's padded end), read from its header on."""
    store, name = split_url(url)
    base = starts[-1] if starts else 0
    with store.open_read(name, base) as stream:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            end = base
            for info in tar:
                end = base + info.offset_data + -(-info.size // 512) * 512
    return end


def check_shards(url_pattern: str, *, write_manifest: bool = False) -> ShardReport:
    """Read every shard a pattern names; report samples, classes, corrupt and unlabeled samples.

    Compares sample counts with the manifest when there is one. ``write_manifest=True``
    writes ``<prefix>.manifest.json`` next to shards written by other tools (e.g. the
    public imagenet-1k-wds shards) so the loader can read them.
    """
    urls = expand_urls(url_pattern)
    labels: Counter = Counter()
    checks = [check_shard(url, labels) for url in urls]
    num_classes = None
    try:
        manifest = read_manifest(manifest_url(urls[0]))
        num_classes = manifest["num_classes"]
        expected = {entry["name"]: entry["samples"] for entry in manifest["shards"]}
        for check in checks:
            count = expected.get(check.url.rpartition("/")[2])
            if not check.error and count != check.samples:
                check.error = f"manifest says {count} samples"
    except (FileNotFoundError, ValueError):
        if write_manifest:
            _write_manifest(urls, checks, labels)
    return ShardReport(url_pattern, checks, labels, num_classes)


def _write_manifest(urls: list[str], checks: list[ShardCheck], labels: Counter) -> None:
    bad = [c.url for c in checks if c.error]
    if bad:
        raise ValueError(f"cannot write a manifest for unreadable shards: {', '.join(bad)}")
    entries = [{"name": c.url.rpartition("/")[2], "samples": c.samples, "bytes": None,
                "offsets": c.offsets + [_data_end(c.url, c.offsets)]} for c in checks]
    num_classes = max(labels) + 1 if labels else 0
    prefix = shard_prefix(urls[0])
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "prefix": prefix,
                "num_samples": sum(c.samples for c in checks), "num_classes": num_classes,
                "classes": [str(i) for i in range(num_classes)], "samples_per_shard": None,
                "shards": entries}
    store, _ = split_url(urls[0])
    store.put(prefix + MANIFEST_SUFFIX, json.dumps(manifest).encode())
