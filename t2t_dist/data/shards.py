"""WebDataset tar shards: write them from an ImageFolder tree, describe them in a manifest, parse them.

A shard holds ``samples_per_shard`` samples (the last one fewer), each as three members
``<key>.jpg`` (the JPEG bytes), ``<key>.cls`` (the class index, ASCII) and ``<key>.json``
(label, class name, source file, size) -- the layout of the public imagenet-1k-wds shards.
Samples are shuffled across shards at write time with a fixed seed.

``<dest>/<prefix>.manifest.json`` sits next to the shards::

    {"format": "t2t-dist-shards", "version": 1, "prefix": ..., "num_samples": N,
     "num_classes": C, "classes": [sorted folder names], "samples_per_shard": ...,
     "shards": [{"name": "<prefix>-0000.tar", "samples": n, "bytes": size,
                 "offsets": [n + 1 byte offsets: each sample's first header, then the data end]}]}

so readers know every size without a scan and fetch any run of samples with one Range read.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import random
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from t2t_dist.data.urls import (MANIFEST_SUFFIX, expand_urls, manifest_url, shard_digits,
                                shard_pattern)
from t2t_dist.storage import LocalStore, S3Store, open_store, split_url

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
MANIFEST_FORMAT = "t2t-dist-shards"


def scan_image_folder(src_dir: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes (sorted folder names) and every (image path, class index) under ``src_dir``."""
    root = Path(src_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist: expected a folder "
                                f"with one sub-folder of images per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples = [(str(path), label) for label, name in enumerate(classes)
               for path in sorted((root / name).rglob("*"))
               if path.suffix.lower() in IMAGE_EXTENSIONS]
    if not samples:
        raise ValueError(f"image folder {str(root)!r} has no images: expected <class>/<image>.jpg "
                         f"files ({', '.join(IMAGE_EXTENSIONS)})")
    return classes, samples


def encode_image(path: str, max_side: int | None) -> tuple[bytes, int, int]:
    """JPEG bytes of an image, the shorter side cut to ``max_side`` when larger; the file as-is
    when it already is a small enough JPEG (no re-encoding loss)."""
    raw = Path(path).read_bytes()
    with Image.open(io.BytesIO(raw)) as image:
        width, height = image.size
        too_big = max_side is not None and min(width, height) > max_side
        if image.format == "JPEG" and not too_big:
            return raw, width, height
        if too_big:
            scale = max_side / min(width, height)
            width, height = max(1, round(width * scale)), max(1, round(height * scale))
            image.draft("RGB", (width, height))
            image = image.convert("RGB").resize((width, height), Image.BICUBIC)
        else:
            image = image.convert("RGB")
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=90)
        return out.getvalue(), width, height


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(payload), 0o444, 0  # mtime 0: reproducible bytes
    tar.addfile(info, io.BytesIO(payload))


def build_shard(samples: list[tuple[str, str, int, str]], max_side: int | None) -> tuple[bytes, list[int]]:
    """Tar bytes for (key, path, label, class name) samples and each sample's byte offset (+ end)."""
    buffer = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, path, label, class_name in samples:
            offsets.append(tar.offset)
            jpeg, width, height = encode_image(path, max_side)
            meta = {"label": label, "class": class_name, "file": Path(path).name,
                    "width": width, "height": height}
            _add_member(tar, f"{key}.jpg", jpeg)
            _add_member(tar, f"{key}.cls", str(label).encode())
            _add_member(tar, f"{key}.json", json.dumps(meta).encode())
        offsets.append(tar.offset)
    return buffer.getvalue(), offsets


def _write_one(store: LocalStore | S3Store, name: str, samples: list, max_side: int | None) -> dict:
    data, offsets = build_shard(samples, max_side)
    store.put(name, data)
    return {"name": name, "samples": len(samples), "bytes": len(data), "offsets": offsets}


def _sample_keys(samples: list[tuple[str, int]], classes: list[str]) -> list[str]:
    """Tar member stems: the file stem (ImageNet's are unique), prefixed by the class when not."""
    stems = [Path(path).stem.replace(".", "_") for path, _ in samples]
    seen: dict[str, int] = {}
    for stem in stems:
        seen[stem] = seen.get(stem, 0) + 1
    return [stem if seen[stem] == 1 else f"{classes[label]}_{stem}".replace(".", "_")
            for stem, (_, label) in zip(stems, samples)]


def write_shards(src_dir: str | Path, dest: str, *, prefix: str = "imagenet1k-train",
                 samples_per_shard: int = 1000, max_side: int | None = None,
                 processes: int | None = None, shuffle_seed: int = 0) -> dict[str, Any]:
    """Write an ImageFolder tree as shuffled tar shards plus a manifest to a folder or s3:// URL.

    Returns the manifest (``num_samples``, ``classes``, ``shards``, ...); ``shard_pattern(dest,
    manifest)`` gives the brace pattern that reads them back.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} is invalid: expected >= 1")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side={max_side} is invalid: expected >= 1 or None")
    classes, samples = scan_image_folder(src_dir)
    keys = _sample_keys(samples, classes)
    rows = [(key, path, label, classes[label]) for key, (path, label) in zip(keys, samples)]
    random.Random(shuffle_seed).shuffle(rows)  # class-sorted shards would make class-sorted batches
    chunks = [rows[i:i + samples_per_shard] for i in range(0, len(rows), samples_per_shard)]
    width = shard_digits(len(chunks))
    names = [f"{prefix}-{index:0{width}d}.tar" for index in range(len(chunks))]
    store = open_store(dest)
    processes = max(1, min(processes or multiprocessing.cpu_count(), len(chunks)))
    if processes == 1:
        entries = [_write_one(store, name, chunk, max_side) for name, chunk in zip(names, chunks)]
    else:
        # fork: workers need nothing re-imported; each builds and uploads whole shards.
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) as pool:
            entries = list(pool.map(_write_one, [store] * len(chunks), names, chunks,
                                    [max_side] * len(chunks)))
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "prefix": prefix,
                "num_samples": len(rows), "num_classes": len(classes), "classes": classes,
                "samples_per_shard": samples_per_shard, "max_side": max_side,
                "shuffle_seed": shuffle_seed, "shards": entries}
    store.put(prefix + MANIFEST_SUFFIX, json.dumps(manifest).encode())
    return manifest


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
    store, name = split_url(url)
    try:
        manifest = json.loads(store.get(name))
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest {url} does not exist: expected the one write_shards "
                                f"writes next to the shards (check_shards(..., write_manifest=True) "
                                f"makes one for shards written elsewhere)") from None
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


def split_member(name: str) -> tuple[str, str]:
    """``dir/n0144_10026.jpg`` -> (``dir/n0144_10026``, ``jpg``): the key ends at the first dot."""
    directory, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


def iter_tar_samples(stream) -> Any:
    """Yield (key, {extension: bytes}, header offset) per sample of a tar byte stream.

    Raises ``tarfile.ReadError`` (or ``EOFError``) where the stream is truncated mid-member;
    the samples before it have been yielded.
    """
    current, fields, start = None, {}, 0
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            key, extension = split_member(info.name)
            if key != current:
                if current is not None:
                    yield current, fields, start
                current, fields, start = key, {}, info.offset
            fields[extension] = tar.extractfile(info).read()
            tar.members = []  # streaming: do not keep every header
    if current is not None:
        yield current, fields, start


def parse_tar_samples(data: bytes) -> list[dict[str, bytes]]:
    """Samples of whole tar members held in memory, in order: a fast path for ``iter_tar_samples``.

    Plain ustar members (what ``write_shards`` and webdataset write) are parsed here, 10x
    cheaper than ``tarfile``; anything else (PAX or GNU long names, odd types) falls back to
    ``tarfile``. Raises ``tarfile.ReadError`` on a header that does not check out.
    """
    view = memoryview(data)
    samples: list[dict[str, bytes]] = []
    current, offset = None, 0
    while offset + 512 <= len(data):
        header = data[offset:offset + 512]
        if header.count(0) == 512:
            break  # end-of-archive blocks
        kind = header[156:157]
        if kind not in (b"0", b"\0") or header[257:262] != b"ustar":
            return [fields for _, fields, _ in iter_tar_samples(io.BytesIO(data))]
        if sum(header[:148]) + sum(header[156:]) + 8 * 32 != int(header[148:156].strip(b"\0 "), 8):
            raise tarfile.ReadError(f"bad tar header checksum at byte {offset}")
        name = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode()
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        key, extension = split_member(f"{prefix}/{name}" if prefix else name)
        if key != current:
            current = key
            samples.append({})
        end = offset + 512 + size
        if end > len(data):
            raise tarfile.ReadError(f"member {name} ends past the data ({end} > {len(data)})")
        samples[-1][extension] = bytes(view[offset + 512:end])
        offset += 512 + -(-size // 512) * 512
    return samples


def sample_label(fields: dict[str, bytes]) -> int | None:
    """The class index from ``cls`` (or ``json["label"]``); None when there is none."""
    try:
        if "cls" in fields:
            return int(fields["cls"].decode().strip())
        if "json" in fields:
            label = json.loads(fields["json"]).get("label")
            return int(label) if label is not None else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return None


def sample_image(fields: dict[str, bytes]) -> bytes | None:
    return next((fields[name] for name in IMAGE_FIELDS if name in fields), None)
