"""Shard URL patterns -> concrete shard URLs, and where each shard's manifest lives.

Accepted: ``s3://bucket/prefix/name-{0000..1023}.tar``, local paths, ``file://`` paths,
globs (``/data/train/*.tar``, ``s3://bucket/train/imagenet1k-train-*.tar``) and brace
patterns; several patterns joined by whitespace or ``::`` (webdataset's separator).
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from typing import Callable

import braceexpand

from t2t_dist.storage import is_s3, split_url

MANIFEST_SUFFIX = ".manifest.json"
PATTERN_SEPARATOR = re.compile(r"(\s+|::)")  # between patterns; captured, so a split keeps it
_GLOB_CHARS = re.compile(r"[*?\[]")
_SHARD_NUMBER = re.compile(r"-\d+\.tar$")


def _expand_glob(url: str) -> list[str]:
    if not is_s3(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        return sorted(glob.glob(os.path.expanduser(path)))
    # S3 has no glob: list from the longest literal prefix, then match the full keys.
    literal = _GLOB_CHARS.split(url, maxsplit=1)[0]
    directory = literal.rpartition("/")[0]
    store, _ = split_url(directory + "/x")
    listed = store.list(literal[len(directory) + 1:])
    return sorted(u for u in (f"{directory}/{key}" for key in listed) if fnmatch.fnmatchcase(u, url))


def split_patterns(pattern: str) -> list[str]:
    """The patterns of a multi-pattern string: ``"a/*.tar::b/*.tar"`` -> ``["a/*.tar", "b/*.tar"]``."""
    return [part for part in PATTERN_SEPARATOR.split(pattern)[::2] if part]


def map_local_parts(pattern: str, fn: Callable[[str], str]) -> str:
    """``pattern`` with ``fn`` applied to each local path in it (not to URLs such as s3:// or
    file://), separators kept as they are: how a driver makes relative shard paths absolute."""
    parts = PATTERN_SEPARATOR.split(pattern)  # odd items are the separators
    return "".join(part if index % 2 or not part or "://" in part else fn(part)
                   for index, part in enumerate(parts))


def expand_urls(pattern: str) -> list[str]:
    """Every shard URL a pattern names, in order, without duplicates; an error if none."""
    urls: list[str] = []
    for part in split_patterns(pattern):
        for url in braceexpand.braceexpand(part):
            urls.extend(_expand_glob(url) if _GLOB_CHARS.search(url) else [url])
    urls = list(dict.fromkeys(urls))
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} matched no shards: expected e.g. "
                         f"s3://bucket/train/name-{{0000..1023}}.tar, /data/train/*.tar")
    return urls


def shard_prefix(url: str) -> str:
    """``.../imagenet1k-train-0042.tar`` -> ``imagenet1k-train``."""
    name = url.rstrip("/").rpartition("/")[2]
    if not _SHARD_NUMBER.search(name):
        raise ValueError(f"shard name {name!r} is invalid: expected PREFIX-NUMBER.tar, "
                         f"e.g. imagenet1k-train-0000.tar")
    return _SHARD_NUMBER.sub("", name)


def manifest_url(shard_url: str) -> str:
    """The manifest that describes a shard: ``<dir>/<prefix>.manifest.json``."""
    directory, sep, _ = shard_url.rstrip("/").rpartition("/")
    return f"{directory}{sep}{shard_prefix(shard_url)}{MANIFEST_SUFFIX}"


def shard_pattern(directory: str, prefix: str, num_shards: int) -> str:
    """The brace pattern naming ``num_shards`` shards written by ``write_shards``."""
    width = shard_digits(num_shards)
    last = f"{num_shards - 1:0{width}d}"
    middle = last if num_shards == 1 else f"{{{0:0{width}d}..{last}}}"
    return f"{directory.rstrip('/')}/{prefix}-{middle}.tar"


def shard_digits(num_shards: int) -> int:
    return max(4, len(str(num_shards - 1)))
