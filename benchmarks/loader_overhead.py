"""Where the training loader's CPU goes beyond the decode itself, per image, in one run:

  1. the whole loader against the tight loop, per decoder, from local shards and from a local
     S3 server (moto over HTTP): user and kernel CPU of the main process and of its DataLoader
     workers, and the workers' page faults per image;
  2. the pieces, one at a time: a batch in fresh shared memory (what a DataLoader worker
     writes into every batch; with and without ``MADV_POPULATE_WRITE``), a ranged GetObject of
     ~16 samples through boto3 and the same range through a presigned URL and urllib3, and the
     JPEG decode at each of libjpeg-turbo's scales M/8 (Pillow's ``draft`` offers 1/1, 1/2,
     1/4, 1/8; simplejpeg also 7/8 .. 5/8), and the crop resize of ``decode_train`` (torch's
     antialiased uint8 bilinear) against Pillow's (``fromarray`` + ``resize(box=...)`` +
     ``asarray``), on the same decoded images and crops;
  3. the simplejpeg tight loop with torch on two threads: OpenMP's idle thread spins between
     the small resizes and is charged as CPU, which is why everything here runs one thread.

The same generated 500x375 JPEGs as ``input_pipeline.py``; torch on one thread, as in
DataLoader workers; each figure is the lowest of ``--rounds``.

    .venv/bin/python benchmarks/loader_overhead.py
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from input_pipeline import photo_like_jpegs, shard_blobs, start_s3_server, tight_loop

MADV_POPULATE_WRITE = 23  # Linux 5.14+


def usage(who) -> np.ndarray:
    found = resource.getrusage(who)
    return np.array([found.ru_utime, found.ru_stime, found.ru_minflt])


def split_run(run) -> np.ndarray:
    """(images, main user s, main sys s, workers user s, workers sys s, workers' page faults)."""
    main, workers = usage(resource.RUSAGE_SELF), usage(resource.RUSAGE_CHILDREN)
    images = run()
    main, workers = usage(resource.RUSAGE_SELF) - main, usage(resource.RUSAGE_CHILDREN) - workers
    return np.array([images, main[0], main[1], workers[0], workers[1], workers[2]])


def shared_batch_us(populate: bool, batches: int = 20) -> float:
    """CPU us per image to allocate a (64, 3, 224, 224) batch in shared memory and fill it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    shape = (64, 3, 224, 224)
    before = usage(resource.RUSAGE_SELF)
    for _ in range(batches):
        storage = torch.UntypedStorage._new_shared(math.prod(shape))
        batch = torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)
        if populate:
            start = batch.data_ptr() & ~4095
            if libc.madvise(start, batch.data_ptr() + batch.numel() - start, MADV_POPULATE_WRITE):
                return float("nan")  # an older kernel
        batch.numpy()[:] = 7
    spent = usage(resource.RUSAGE_SELF) - before
    return 1e6 * (spent[0] + spent[1]) / (batches * shape[0])


def range_read_ms(size: int, reads: int = 40) -> dict[str, float]:
    """CPU ms per ranged read of ``size`` bytes: our S3 store (boto3), presigned URL + urllib3."""
    import boto3
    import urllib3

    from t2t_dist.storage import S3Store

    client = boto3.client("s3")
    client.create_bucket(Bucket="overhead")
    client.put_object(Bucket="overhead", Key="blob", Body=os.urandom(size + 4096))
    store, pool = S3Store("overhead"), urllib3.PoolManager()
    url = client.generate_presigned_url("get_object", Params={"Bucket": "overhead", "Key": "blob"})

    def ours():
        with store.open_read("blob", 1024, 1024 + size) as stream:
            stream.read()

    def presigned():
        pool.request("GET", url, headers={"Range": f"bytes=1024-{1023 + size}"}).data

    times = {}
    for name, read in (("boto3 GetObject (ours)", ours), ("presigned URL + urllib3", presigned)):
        read()
        before = usage(resource.RUSAGE_SELF)
        for _ in range(reads):
            read()
        spent = usage(resource.RUSAGE_SELF) - before
        times[name] = 1e3 * (spent[0] + spent[1]) / reads
    return times


def scaled_decode_ms(blobs: list[bytes]) -> dict[int, float]:
    """CPU ms per 500x375 JPEG decoded at libjpeg-turbo's scale M/8."""
    import simplejpeg

    times = {}
    for eighths in (8, 7, 6, 5, 4):
        before = time.process_time()
        for blob in blobs:
            simplejpeg.decode_jpeg(blob, "RGB", min_width=math.ceil(500 * eighths / 8),
                                   min_height=math.ceil(375 * eighths / 8))
        times[eighths] = 1e3 * (time.process_time() - before) / len(blobs)
    return times


def resize_us(blobs: list[bytes], img_size: int = 224) -> dict[str, float]:
    """CPU us per crop resized by ours (torch) and by Pillow, same decoded images and crops."""
    import simplejpeg
    from PIL import Image

    from t2t_dist.data.transforms import _crop_resize, train_crop

    pixels = [simplejpeg.decode_jpeg(blob, "RGB") for blob in blobs]
    boxes = []
    for position, image in enumerate(pixels):
        (left, top, width, height), _ = train_crop(
            image.shape[1], image.shape[0], scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
            rng=np.random.default_rng([0, 0, position]))
        boxes.append((left, top, left + width, top + height))

    def pillow(image, box):
        return np.asarray(Image.fromarray(image).resize((img_size, img_size), Image.BILINEAR, box=box))

    times = {}
    for name, resize in (("torch (ours)", lambda image, box: _crop_resize(image, box, img_size, False)),
                         ("Pillow", pillow)):
        before = time.process_time()
        for image, box in zip(pixels, boxes):
            resize(image, box)
        times[name] = 1e6 * (time.process_time() - before) / len(pixels)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import boto3

    from t2t_dist.config import DataConfig
    from t2t_dist.data import build_train_loader, manifest_pattern, write_shards

    server, _ = start_s3_server()
    try:
        with tempfile.TemporaryDirectory(prefix="overhead-") as scratch:
            scratch = Path(scratch)
            photo_like_jpegs(scratch / "tree", args.images)
            boto3.client("s3").create_bucket(Bucket="bench")
            kwargs = dict(prefix="overhead", samples_per_shard=128)
            local = manifest_pattern(str(scratch / "shards"),
                                     write_shards(scratch / "tree", scratch / "shards", **kwargs))
            remote = manifest_pattern("s3://bench/shards",
                                      write_shards(scratch / "tree", "s3://bench/shards", **kwargs))
            blobs = shard_blobs(local)

            def loader(pattern, decoder):
                config = DataConfig(train_urls=pattern, loader_workers=args.workers, decoder=decoder)
                return lambda: sum(len(labels) for _, labels in
                                   build_train_loader(config, img_size=224, micro_batch=64))

            def tight(decoder):
                config = DataConfig(train_urls=local, decoder=decoder)
                return lambda: tight_loop(blobs, 224, config)[0]

            runs = {f"{where}, {decoder}": run for decoder in ("pil", "simplejpeg")
                    for where, run in (("tight loop", tight(decoder)),
                                       ("our loader, local", loader(local, decoder)),
                                       ("our loader, S3", loader(remote, decoder)))}
            best: dict[str, np.ndarray] = {}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    found = split_run(run)
                    if name not in best or found[1:5].sum() < best[name][1:5].sum():
                        best[name] = found
            pieces = {"batch in fresh shared memory": min(shared_batch_us(False) for _ in range(args.rounds)),
                      "the same, MADV_POPULATE_WRITE": min(shared_batch_us(True) for _ in range(args.rounds))}
            reads = [range_read_ms(16 * 90 * 1024) for _ in range(args.rounds)]
            scales = [scaled_decode_ms(blobs[:300]) for _ in range(args.rounds)]
            resizes = [resize_us(blobs[:300]) for _ in range(args.rounds)]
            torch.set_num_threads(2)
            two_threads = min(split_run(tight("simplejpeg"))[1:3].sum() for _ in range(args.rounds))
            torch.set_num_threads(1)
    finally:
        server.terminate()
        server.wait()

    print(f"{args.images} 500x375 JPEGs, crop 224, batch 64, {args.workers} loader workers; "
          f"CPU ms per image, lowest of {args.rounds} rounds")
    print("| run | total | main user | main sys | workers user | workers sys | workers' page faults |")
    print("|---|---|---|---|---|---|---|")
    for name, (images, *cpu, faults) in best.items():
        cpu = [1e3 * value / images for value in cpu]
        print(f"| {name} | {sum(cpu):.3f} | " + " | ".join(f"{value:.3f}" for value in cpu)
              + f" | {faults / images:.1f} |")
    print("\n| piece | CPU |\n|---|---|")
    for name, value in pieces.items():
        print(f"| {name}, per image | {value:.0f} us |")
    for name in reads[0]:
        print(f"| ranged read of 1.4 MB (16 samples), {name} | "
              f"{min(read[name] for read in reads):.2f} ms |")
    for eighths in scales[0]:
        print(f"| decode 500x375 at scale {eighths}/8 | {min(s[eighths] for s in scales):.2f} ms |")
    for name in resizes[0]:
        print(f"| crop resize to 224, {name} | {min(r[name] for r in resizes):.0f} us |")
    print(f"| tight loop, simplejpeg, torch on 2 threads, per image | "
          f"{1e3 * two_threads / args.images:.3f} ms |")


if __name__ == "__main__":
    main()
