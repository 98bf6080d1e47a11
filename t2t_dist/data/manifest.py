"""The manifest beside the shards, and the table of shards a URL pattern names.

``<dir>/<prefix>.manifest.json``, written by ``write_shards`` (or by ``t2t-dist shards check
PATTERN --write-manifest`` for shards written by other tools)::

    {"format": "t2t-dist-shards", "version": 1, "prefix": ..., "num_samples": N,
     "num_classes": C, "classes": [sorted folder names], "samples_per_shard": ...,
     "shards": [{"name": "<prefix>-0000.tar", "samples": n, "bytes": size,
                 "offsets": [n + 1 byte offsets: each sample's first header, then the data end]}]}

so readers know every size without a scan and fetch any run of samples with one Range read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from t2t_dist.data.urls import MANIFEST_SUFFIX, expand_urls, manifest_url, shard_pattern
from t2t_dist.storage import LocalStore, S3Store, split_url

MANIFEST_FORMAT = "t2t-dist-shards"
MANIFEST_VERSION = 1


def new_manifest(prefix: str, classes: list[str], shards: list[dict[str, Any]],
                 **details: Any) -> dict[str, Any]:
    """A manifest for ``shards`` (``{"name", "samples", "bytes", "offsets"}`` each); ``details``
    records how they were written (``samples_per_shard``, ``max_side``, ...)."""
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "prefix": prefix,
            "num_samples": sum(entry["samples"] for entry in shards),
            "num_classes": len(classes), "classes": classes, **details, "shards": shards}


def save_manifest(store: LocalStore | S3Store, manifest: dict[str, Any]) -> str:
    """Write ``manifest`` into ``store``, the folder of its shards; returns its URL."""
    name = manifest["prefix"] + MANIFEST_SUFFIX
    store.put(name, json.dumps(manifest).encode())
    return store.url(name)


def manifest_pattern(dest: str, manifest: dict[str, Any]) -> str:
    """Brace pattern of the shards a manifest describes, under ``dest``."""
    return shard_pattern(str(dest), manifest["prefix"], len(manifest["shards"]))


@dataclass(frozen=True)
class ShardTable:
    """The shards one URL pattern names, with sizes and offsets from their manifests."""

    urls: tuple[str, ...]
    sizes: np.ndarray  # (num_shards,) samples per shard
    offsets: tuple[np.ndarray, ...]  # per shard, (samples + 1,) byte offsets
    classes: tuple[str, ...]

    @property
    def num_samples(self) -> int:
        return int(self.sizes.sum())


def read_manifest(url: str) -> dict[str, Any]:
    """The manifest at ``url``; FileNotFoundError naming the command that writes a missing one."""
    store, name = split_url(url)
    try:
        manifest = json.loads(store.get(name))
    except FileNotFoundError:
        directory = url.rpartition("/")[0]
        shards = f"{directory}/{name[:-len(MANIFEST_SUFFIX)]}-*.tar"
        raise FileNotFoundError(f"manifest {url} does not exist: expected the one `t2t-dist shards "
                                f"write` writes next to the shards; for shards written by other "
                                f"tools run `t2t-dist shards check '{shards}' --write-manifest`"
                                ) from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"manifest {url} is invalid: expected format {MANIFEST_FORMAT!r}")
    return manifest


def load_shard_table(pattern: str) -> ShardTable:
    """Expand ``pattern`` and look every shard up in its manifest (no shard is opened)."""
    urls = expand_urls(pattern)
    manifests: dict[str, dict] = {}
    sizes, offsets, classes = [], [], None
    for url in urls:
        where = manifest_url(url)
        if where not in manifests:
            manifest = read_manifest(where)
            manifest["by_name"] = {entry["name"]: entry for entry in manifest["shards"]}
            manifests[where] = manifest
            if classes is not None and tuple(manifest["classes"]) != classes:
                raise ValueError(f"manifest {where} lists other classes than the first manifest "
                                 f"of {pattern!r}: expected shards of one data set")
            classes = tuple(manifest["classes"])
        entry = manifests[where]["by_name"].get(url.rpartition("/")[2])
        if entry is None:
            raise ValueError(f"shard {url} is not in manifest {where}: expected one of its "
                             f"{len(manifests[where]['shards'])} shards")
        sizes.append(entry["samples"])
        offsets.append(np.asarray(entry["offsets"], dtype=np.int64))
    return ShardTable(tuple(urls), np.asarray(sizes, dtype=np.int64), tuple(offsets), classes)


def check_shards_exist(pattern: str) -> ShardTable:
    """The ``ShardTable`` of ``pattern`` after checking that every shard is in its manifest and
    exists: manifests and one listing per shard folder are read, never a shard.

    Raises ValueError (empty or malformed pattern, no match, a shard not in its manifest) or
    FileNotFoundError (a manifest or shard that does not exist), with one-line messages;
    storage errors (botocore: no credentials, endpoint unreachable) pass through unchanged.
    """
    if not pattern.strip():
        raise ValueError("shard pattern is empty: expected shard URLs such as "
                         "s3://bucket/train/name-{0000..1023}.tar or a local pattern "
                         "(or digits://train and digits://val, the built-in demo data)")
    table = load_shard_table(pattern)
    listings: dict[str, set[str]] = {}
    for url in table.urls:
        folder, _, name = url.rpartition("/")
        if folder not in listings:
            store, _ = split_url(url)
            listings[folder] = set(store.list())
        if name not in listings[folder]:
            raise FileNotFoundError(f"shard {url} does not exist, though its manifest lists it: "
                                    f"expected every shard of {pattern!r} to exist")
    return table



def describe_shards(pattern: str) -> dict[str, Any]:
    """What a run records about the shards ``pattern`` names (its MLflow dataset inputs),
    from their manifests alone: ``name`` (the shards' prefix), ``source`` (the pattern),
    ``digest`` (a hash of every shard's name and sample offsets and of the classes: the same
    shards give the same digest wherever they are stored), ``num_samples``, ``num_classes``,
    ``num_shards``."""
    table = load_shard_table(pattern)
    digest = hashlib.sha256(json.dumps(list(table.classes)).encode())
    for url, offsets in zip(table.urls, table.offsets):
        digest.update(url.rpartition("/")[2].encode())
        digest.update(offsets.astype("<i8").tobytes())
    first = table.urls[0].rpartition("/")[2] if table.urls else pattern
    return {"name": re.sub(r"-\d+\.tar$", "", first), "source": pattern,
            "digest": digest.hexdigest()[:16], "num_samples": table.num_samples,
            "num_classes": len(table.classes), "num_shards": len(table.urls)}
