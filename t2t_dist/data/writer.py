"""Write an ImageFolder tree as WebDataset tar shards plus their manifest (``t2t-dist shards write``).

A shard holds up to ``samples_per_shard`` samples, each as three members ``<key>.cls`` (the
class index, ASCII), ``<key>.jpg`` (the JPEG bytes) and ``<key>.json`` (label, class name,
source file, size) -- the layout of the public imagenet-1k-wds shards, written by
webdataset's ``TarWriter``. Samples are shuffled across shards at write time with a fixed
seed. Every image is decoded on the way (a JPEG that is already RGB or grayscale and small
enough is stored as-is, anything else -- CMYK JPEGs, PNGs named .jpg -- as an RGB JPEG);
files that do not decode (empty, truncated, not an image) are skipped and listed with the
reason in ``<prefix>.bad-files.json`` beside the manifest, so a shard may hold fewer
samples than its neighbours. The manifest (``manifest.py``) records what was written: each
shard's sample count and each sample's byte offset, taken from the tar stream.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import random
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

import webdataset
from PIL import Image, UnidentifiedImageError

from t2t_dist.data.manifest import new_manifest, save_manifest
from t2t_dist.data.urls import shard_digits
from t2t_dist.storage import LocalStore, S3Store, open_store

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BAD_FILES_SUFFIX = ".bad-files.json"
_KEPT_JPEG_MODES = ("RGB", "L")  # what the loader decodes as stored; CMYK etc. are re-encoded
_POLL_S = 0.25  # how often the parent passes the workers' image count on to ``progress``


class BadImageError(ValueError):
    """A source file that is not a usable image (raised with ``strict=True``)."""


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
    when it already is a small enough RGB or grayscale JPEG (no re-encoding loss).

    The image is decoded either way, so a truncated or corrupt file fails here (``OSError``
    and friends from PIL; ``BadImageError`` for an empty file), not later in a training run.
    """
    raw = Path(path).read_bytes()
    if not raw:
        raise BadImageError("empty file")
    with Image.open(io.BytesIO(raw)) as image:
        width, height = image.size
        too_big = max_side is not None and min(width, height) > max_side
        if image.format == "JPEG" and image.mode in _KEPT_JPEG_MODES and not too_big:
            image.draft(None, (max(1, width // 8), max(1, height // 8)))  # 1/8 scale: 8x cheaper
            image.load()  # and still reads every byte: truncation shows
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


def bad_file_reason(error: Exception) -> str:
    """One line saying why a file is not a usable image."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image: PIL cannot identify the format"
    if isinstance(error, BadImageError):
        return str(error)
    return f"{type(error).__name__}: {error}".replace("\n", " ")


def build_shard(samples: list[tuple[str, str, int, str]], max_side: int | None, *,
                strict: bool = False, on_image: Callable[[], None] | None = None,
                ) -> tuple[bytes, list[int], list[tuple[str, str]]]:
    """Tar bytes for (key, path, label, class name) samples, each written sample's byte offset
    (+ the end), and the (path, reason) of each file skipped as not a usable image.

    ``strict=True`` raises ``BadImageError`` at the first such file instead; ``on_image()`` is
    called after each file, written or skipped.
    """
    buffer = io.BytesIO()
    offsets, skipped = [], []
    # mtime=0: reproducible bytes, and plain ustar headers; webdataset's default (the current
    # time, a float) makes tarfile put a PAX header before every member, which the range
    # reader's fast path does not parse (see data/tar.py).
    with webdataset.TarWriter(buffer, encoder=False, mtime=0) as tar:
        for key, path, label, class_name in samples:
            try:
                jpeg, width, height = encode_image(path, max_side)
            except Exception as error:  # PIL raises many kinds on bad data (OSError, SyntaxError..)
                reason = bad_file_reason(error)
                if strict:
                    raise BadImageError(f"{path} is not a usable image ({reason}): expected a "
                                        f"decodable JPEG/PNG/BMP/WebP (without --strict bad files "
                                        f"are skipped and listed in *{BAD_FILES_SUFFIX})") from None
                skipped.append((path, reason))
            else:
                offsets.append(tar.tarstream.offset)
                meta = {"label": label, "class": class_name, "file": Path(path).name,
                        "width": width, "height": height}
                tar.write({"__key__": key, "jpg": jpeg, "cls": str(label).encode(),
                           "json": json.dumps(meta).encode()})  # members in name order: cls, jpg, json
            if on_image is not None:
                on_image()
        offsets.append(tar.tarstream.offset)
    return buffer.getvalue(), offsets, skipped


_worker_images = None  # in pool workers: the shared count of files done (set by _init_worker)


def _init_worker(counter) -> None:
    global _worker_images
    _worker_images = counter


def _count_image() -> None:
    with _worker_images.get_lock():
        _worker_images.value += 1


def _write_one(store: LocalStore | S3Store, name: str, samples: list, max_side: int | None,
               strict: bool, on_image: Callable[[], None] | None) -> tuple[dict, list]:
    data, offsets, skipped = build_shard(samples, max_side, strict=strict, on_image=on_image)
    store.put(name, data)
    entry = {"name": name, "samples": len(offsets) - 1, "bytes": len(data), "offsets": offsets}
    return entry, skipped


def _write_in_pool(processes: int, store, names: list[str], chunks: list, max_side: int | None,
                   strict: bool, progress) -> list[tuple[dict, list]]:
    """``_write_one`` for every shard in a fork pool; the first error (in shard order among those
    that failed) stops the rest; the parent passes the workers' image count on to ``progress``."""
    context = multiprocessing.get_context("fork")  # workers need nothing re-imported
    counter = context.Value("q", 0)
    pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_init_worker,
                               initargs=(counter,))
    try:
        futures = [pool.submit(_write_one, store, name, chunk, max_side, strict, _count_image)
                   for name, chunk in zip(names, chunks)]
        pending, reported = set(futures), 0
        while pending:
            done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_EXCEPTION)
            if progress is not None:
                count = counter.value
                progress.update(count - reported)
                reported = count
            if any(future.exception() for future in done):
                break
        return [future.result() for future in futures]  # raises the first shard's error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
                 processes: int | None = None, shuffle_seed: int = 0, strict: bool = False,
                 progress=None) -> dict[str, Any]:
    """Write an ImageFolder tree as shuffled tar shards plus a manifest to a folder or s3:// URL.

    Files that are not usable images are skipped and listed (source-relative path, class,
    reason) in ``<prefix>.bad-files.json`` beside the manifest; ``strict=True`` raises
    ``BadImageError`` naming the first one instead, and writes no manifest. ``progress``: a
    tqdm-like object; its ``total`` is set to the number of files found, then ``update(n)``
    is called as files are done.

    Returns the manifest (``num_samples``, ``classes``, ``shards``, ``bad_files``, ...);
    ``manifest_pattern(dest, manifest)`` gives the brace pattern that reads them back.
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
    if progress is not None:
        progress.total = len(rows)
    processes = max(1, min(processes or multiprocessing.cpu_count(), len(chunks)))
    if processes == 1:
        on_image = None if progress is None else (lambda: progress.update(1))
        results = [_write_one(store, name, chunk, max_side, strict, on_image)
                   for name, chunk in zip(names, chunks)]
    else:
        results = _write_in_pool(processes, store, names, chunks, max_side, strict, progress)
    entries = [entry for entry, _ in results]
    labels = {path: label for path, label in samples}
    root = Path(src_dir)
    bad_files = sorted(({"path": Path(path).relative_to(root).as_posix(),
                         "class": classes[labels[path]], "reason": reason}
                        for _, skipped in results for path, reason in skipped),
                       key=lambda row: row["path"])
    report = {"source": root.name, "num_files": len(rows), "num_bad_files": len(bad_files),
              "bad_files": bad_files}
    store.put(prefix + BAD_FILES_SUFFIX, (json.dumps(report, indent=1) + "\n").encode())
    if len(bad_files) == len(rows):
        raise ValueError(f"image folder {str(root)!r} has no usable images: all {len(rows)} files "
                         f"failed to decode (see {store.url(prefix + BAD_FILES_SUFFIX)})")
    manifest = new_manifest(prefix, classes, entries, samples_per_shard=samples_per_shard,
                            max_side=max_side, shuffle_seed=shuffle_seed,
                            bad_files=len(bad_files))
    save_manifest(store, manifest)
    return manifest


def bad_files_url(dest: str, prefix: str) -> str:
    """URL of the bad-files report ``write_shards`` writes beside the manifest."""
    return open_store(dest).url(prefix + BAD_FILES_SUFFIX)
