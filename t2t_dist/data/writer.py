"""Write an ImageFolder tree as WebDataset tar shards plus their manifest (``t2t-dist shards write``).

A shard holds ``samples_per_shard`` samples (the last one fewer), each as three members
``<key>.cls`` (the class index, ASCII), ``<key>.jpg`` (the JPEG bytes) and ``<key>.json``
(label, class name, source file, size) -- the layout of the public imagenet-1k-wds shards,
written by webdataset's ``TarWriter``. Samples are shuffled across shards at write time with
a fixed seed. The manifest (``manifest.py``) records each sample's byte offset, taken from
the tar stream as it is written.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import webdataset
from PIL import Image

from t2t_dist.data.manifest import new_manifest, save_manifest
from t2t_dist.data.urls import shard_digits
from t2t_dist.storage import LocalStore, S3Store, open_store

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


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


def build_shard(samples: list[tuple[str, str, int, str]], max_side: int | None) -> tuple[bytes, list[int]]:
    """Tar bytes for (key, path, label, class name) samples and each sample's byte offset (+ end)."""
    buffer = io.BytesIO()
    offsets = []
    # mtime=0: reproducible bytes, and plain ustar headers; webdataset's default (the current
    # time, a float) makes tarfile put a PAX header before every member, which the range
    # reader's fast path does not parse (see data/tar.py).
    with webdataset.TarWriter(buffer, encoder=False, mtime=0) as tar:
        for key, path, label, class_name in samples:
            offsets.append(tar.tarstream.offset)
            jpeg, width, height = encode_image(path, max_side)
            meta = {"label": label, "class": class_name, "file": Path(path).name,
                    "width": width, "height": height}
            tar.write({"__key__": key, "jpg": jpeg, "cls": str(label).encode(),
                       "json": json.dumps(meta).encode()})  # members in name order: cls, jpg, json
        offsets.append(tar.tarstream.offset)
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

    Returns the manifest (``num_samples``, ``classes``, ``shards``, ...); ``manifest_pattern(dest,
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
    manifest = new_manifest(prefix, classes, entries, samples_per_shard=samples_per_shard,
                            max_side=max_side, shuffle_seed=shuffle_seed)
    save_manifest(store, manifest)
    return manifest
