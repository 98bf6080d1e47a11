"""Read shards back and report what is in them: ``t2t-dist shards check URL_PATTERN``.

Each shard is streamed once, start to end, through webdataset's tar iterators, and every
image is decoded. The same bytes pass through our ``TarIndex`` on the way: it catches a cut
or bad header that ``tarfile`` would take for the end of the archive, and gives each
sample's byte offset for ``--write-manifest`` (the loader's range reads need them).
"""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_iterator

from t2t_dist.data.manifest import new_manifest, read_manifest, save_manifest
from t2t_dist.data.tar import TarIndex, sample_image, sample_label, split_member
from t2t_dist.data.urls import expand_urls, manifest_url, shard_prefix
from t2t_dist.storage import split_url


@dataclass
class ShardCheck:
    url: str
    samples: int = 0
    corrupt: int = 0  # image missing or not decodable
    unlabeled: int = 0
    error: str = ""  # "missing", "truncated: ...", "unreadable: ..." or "manifest says N samples"
    offsets: list[int] = field(default_factory=list)  # manifest offsets: sample starts, data end


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


def _raise(error: Exception) -> bool:
    raise error


class _Tee:
    """A byte stream that shows every byte read from it to a ``TarIndex`` too."""

    def __init__(self, stream, index: TarIndex):
        self.stream, self.index = stream, index

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.index.feed(data)
        return data


def _samples(stream, url: str):
    """``{extension: bytes}`` per sample of a tar stream, grouped by key as the loader groups them."""
    members = ({**member, "__url__": url} for member in tar_file_iterator(stream, handler=_raise))
    return group_by_keys(members, keys=split_member, handler=_raise)


def _tally(check: ShardCheck, fields: dict, labels: Counter, progress) -> None:
    check.samples += 1
    if progress is not None:
        progress.update(1)
    check.corrupt += not _image_ok(sample_image(fields))
    label = sample_label(fields)
    if label is None:
        check.unlabeled += 1
    else:
        labels[label] += 1


def check_shard(url: str, labels: Counter, progress=None) -> ShardCheck:
    """Stream one shard start to end, decoding every image; a cut shard's last sample is left out.
    ``progress.update(1)`` (tqdm-like) is called per sample."""
    check = ShardCheck(url)
    store, name = split_url(url)
    index = TarIndex()
    held, streamed = None, False  # the latest sample is whole once the next one comes
    try:
        with store.open_read(name) as stream:
            for fields in _samples(_Tee(stream, index), url):
                if held is not None:
                    _tally(check, held, labels, progress)
                held = fields
            streamed = True  # at the end-of-archive block, or at a header tarfile took for it
            while not (index.ended or index.error) and (rest := stream.read(1 << 20)):
                index.feed(rest)
        check.offsets = index.offsets()
    except FileNotFoundError:
        check.error = "missing"
    except (tarfile.TarError, EOFError, OSError) as error:
        # webdataset appends " @ <stream object>" to the message, which says nothing here.
        check.error = f"truncated: {str(error).split(' @ ')[0]}"
    except ValueError as error:  # webdataset: a member name twice in one sample
        check.error = f"unreadable: {error.args[0]}"  # webdataset appends (stream, url) to args
    if held is not None and not (streamed and check.error):
        _tally(check, held, labels, progress)
    if not check.error and len(check.offsets) != check.samples + 1:
        check.error = (f"unreadable: {check.samples} samples by webdataset, "
                       f"{len(check.offsets) - 1} by the tar headers")
    return check


def check_shards(url_pattern: str, *, write_manifest: bool = False,
                 progress=None) -> ShardReport:
    """Read every shard a pattern names; report samples, classes, corrupt and unlabeled samples.

    Compares sample counts with the manifest when there is one. ``write_manifest=True``
    writes ``<prefix>.manifest.json`` next to shards written by other tools (e.g. the
    public imagenet-1k-wds shards) so the loader can read them. ``progress``: a tqdm-like
    object; its ``total`` is set to the manifest's sample count when there is a manifest,
    then ``update(1)`` is called per sample read.
    """
    urls = expand_urls(url_pattern)
    try:
        manifest = read_manifest(manifest_url(urls[0]))
        expected = {entry["name"]: entry["samples"] for entry in manifest["shards"]}
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # none, or not one of ours
        manifest, expected = None, None
    names = [url.rpartition("/")[2] for url in urls]
    if progress is not None and expected is not None:
        progress.total = sum(expected.get(name, 0) for name in names)
    labels: Counter = Counter()
    checks = [check_shard(url, labels, progress) for url in urls]
    if expected is not None:
        for check, name in zip(checks, names):
            if check.error:
                continue
            if name not in expected:
                check.error = f"not in the manifest ({len(expected)} shards)"
            elif expected[name] != check.samples:
                check.error = f"manifest says {expected[name]} samples"
    elif write_manifest:
        _write_manifest(urls, checks, labels)
    num_classes = manifest.get("num_classes") if manifest is not None else None
    return ShardReport(url_pattern, checks, labels, num_classes)


def _write_manifest(urls: list[str], checks: list[ShardCheck], labels: Counter) -> None:
    bad = [c.url for c in checks if c.error]
    if bad:
        raise ValueError(f"cannot write a manifest for unreadable shards: {', '.join(bad)}")
    entries = [{"name": c.url.rpartition("/")[2], "samples": c.samples, "bytes": None,
                "offsets": c.offsets} for c in checks]
    num_classes = max(labels) + 1 if labels else 0
    manifest = new_manifest(shard_prefix(urls[0]), [str(i) for i in range(num_classes)], entries,
                            samples_per_shard=None)
    save_manifest(split_url(urls[0])[0], manifest)
