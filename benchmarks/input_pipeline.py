"""Input pipeline throughput in images per CPU-second, side by side in one run, on the same shards:

  (a) a tight decode + RandomResizedCrop + flip loop over in-memory JPEG bytes (one process),
  (b) our training loader on local shards,
  (c) our training loader streaming the same shards from a local S3 server (moto, HTTP),
  (d) webdataset's own pipeline from the same server, as its documentation writes it:
      ``wds.WebDataset(urls, nodesplitter=wds.split_by_node, shardshuffle=100)``, a 1,000-sample
      shuffle buffer, ``.decode("pil")``, the same crop + flip, ``.batched(B)``, in a DataLoader
      with the same workers; shards through ``pipe:aws s3 cp URL -`` (the documented S3 form)
      and through ``pipe:curl --aws-sigv4`` (the cheapest pipe: no Python start per shard),
  and the decode options: ``data.decoder=simplejpeg``, and shards re-encoded with
  ``shards write --max-side N`` (short side N, JPEG quality 90).

The benchmark runs torch with one thread, as DataLoader workers do: the tight loop is one
core's cost (with more threads, OpenMP's idle threads spin between the small resizes and
double the CPU they are charged). "vs own tight loop" compares a loader row with the tight
loop of the same decoder and shards: what the loader adds to the decode itself.

CPU time = getrusage(RUSAGE_SELF) + getrusage(RUSAGE_CHILDREN) deltas around each run: the
main process plus its DataLoader workers (joined at the end of the epoch, so counted) and
their children (webdataset's pipe commands). The S3 server is a separate process that
outlives the measurement, so its CPU is not counted (a real object store does not run on the
training node either).

Two rates per row: "whole" = images / CPU-s of one epoch over all shards, fixed costs
included (forking the workers, boto3 clients, manifest); "steady" = (images(all) -
images(half)) / (CPU(all) - CPU(half)) from a second run over the first half of the shards,
which cancels those per-epoch fixed costs -- the rate a long ImageNet epoch sees. "cores per
GPU" = 6,000 images/s (T2T-ViT-14 bf16 on an H100) / steady rate. The rows run in
interleaved rounds (every row once per round) and each keeps its least-disturbed round
(lowest CPU), so a change in the machine's load hits every row alike.

    .venv/bin/python benchmarks/input_pipeline.py                    # ImageNet-like 500x375 JPEGs
    .venv/bin/python benchmarks/input_pipeline.py --max-side 256 320 --rounds 3
    .venv/bin/python benchmarks/input_pipeline.py --digits --img-size 32
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def cpu_seconds() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def photo_like_jpegs(root: Path, count: int, classes: int = 10) -> None:
    """500x375 JPEGs with smooth structure plus texture, ~100 KB like ImageNet photos."""
    rng = np.random.default_rng(0)
    for index in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        texture = rng.normal(0, 18, (375, 500, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float32) + texture, 0, 255).astype(np.uint8)
        folder = root / f"class{index % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"photo{index:05d}.jpg", quality=90)


def start_s3_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    return server, f"http://127.0.0.1:{port}"


GPU_IMAGES_PER_S = 6000  # T2T-ViT-14, bf16, one H100


def shard_blobs(pattern: str) -> list[bytes]:
    """The image bytes of every sample of local shards, in stored order."""
    from t2t_dist.data import expand_urls
    from t2t_dist.data.tar import parse_tar_samples, sample_image

    return [sample_image(sample) for url in expand_urls(pattern)
            for sample in parse_tar_samples(Path(url).read_bytes())]


def tight_loop(blobs: list[bytes], img_size: int, config) -> tuple[int, float, float]:
    from t2t_dist.data.transforms import decode_train

    cpu, wall = cpu_seconds(), time.perf_counter()
    for position, blob in enumerate(blobs):
        rng = np.random.default_rng([0, 0, position])
        decode_train(blob, img_size, scale=config.crop_scale, ratio=config.crop_ratio,
                     hflip=config.hflip, rng=rng, decoder=config.decoder)
    return len(blobs), cpu_seconds() - cpu, time.perf_counter() - wall


def loader_run(config, img_size: int, batch: int) -> tuple[int, float, float]:
    from t2t_dist.data import build_train_loader

    loader = build_train_loader(config, img_size=img_size, micro_batch=batch)
    cpu, wall = cpu_seconds(), time.perf_counter()
    images = sum(len(labels) for _, labels in loader)
    return images, cpu_seconds() - cpu, time.perf_counter() - wall


def _wds_crop(img_size: int, config):
    """PIL image -> uint8 (3, S, S): the same RandomResizedCrop + flip as ours, on the full decode."""
    from PIL import Image

    from t2t_dist.data.transforms import crop_params

    rng = np.random.default_rng()

    def crop(image):
        left, top, crop_w, crop_h = crop_params(*image.size, config.crop_scale, config.crop_ratio, rng)
        out = image.resize((img_size, img_size), Image.BILINEAR,
                           box=(left, top, left + crop_w, top + crop_h))
        if rng.random() < config.hflip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out).transpose(2, 0, 1)

    return crop


def wds_run(urls: list[str], img_size: int, batch: int, workers: int, config):
    """webdataset's documented ImageNet pipeline over ``urls`` (pipe: commands)."""
    import torch
    import webdataset as wds

    dataset = (wds.WebDataset(urls, nodesplitter=wds.split_by_node, shardshuffle=100,
                              empty_check=False)
               .shuffle(1000).decode("pil").to_tuple("jpg", "cls")
               .map_tuple(_wds_crop(img_size, config), int).batched(batch, partial=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                         prefetch_factor=2 if workers else None)
    cpu, wall = cpu_seconds(), time.perf_counter()
    images = sum(len(labels) for _, labels in loader)
    return images, cpu_seconds() - cpu, time.perf_counter() - wall


def pipe_urls(pattern: str, endpoint: str, how: str) -> list[str]:
    """webdataset ``pipe:`` URLs of S3 shards: ``aws s3 cp`` or curl with SigV4 signing."""
    from t2t_dist.data import expand_urls

    urls = expand_urls(pattern)
    if how == "aws":
        return [f"pipe:aws s3 cp --quiet {url} -" for url in urls]
    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    region = os.environ["AWS_DEFAULT_REGION"]
    return [f"pipe:curl -s -f --aws-sigv4 aws:amz:{region}:s3 --user {key}:{secret} "
            f"{endpoint}/{url[len('s3://'):]}" for url in urls]


def first_half(pattern: str) -> str:
    """The brace pattern of the first half of a pattern's shards."""
    from t2t_dist.data import expand_urls

    urls = expand_urls(pattern)
    return " ".join(urls[: len(urls) // 2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; each row keeps its lowest-CPU round")
    parser.add_argument("--max-side", type=int, nargs="*", default=[256],
                        help="also pre-resized shards with these short sides")
    parser.add_argument("--no-wds", action="store_true", help="leave out webdataset's pipeline")
    parser.add_argument("--digits", action="store_true", help="scikit-learn digits instead")
    args = parser.parse_args()

    from t2t_dist.config import DataConfig
    from t2t_dist.data import make_digits_dataset, manifest_pattern, write_shards

    import torch

    torch.set_num_threads(1)
    server, endpoint = start_s3_server()
    rows: dict[str, tuple] = {}  # name -> (run, run over the first half)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
            scratch = Path(scratch)
            import boto3

            boto3.client("s3").create_bucket(Bucket="bench")
            sets = []  # (label, local pattern, S3 pattern)
            if args.digits:
                local = make_digits_dataset(str(scratch / "digits"), img_size=64)["train"]
                remote = make_digits_dataset("s3://bench/digits", img_size=64)["train"]
                sets.append(("digits", local, remote))
            else:
                photo_like_jpegs(scratch / "tree", args.images)
                for side in [None, *args.max_side]:
                    name = f"side{side}" if side else "full"
                    kwargs = dict(prefix=f"bench-{name}", samples_per_shard=args.samples_per_shard,
                                  max_side=side)
                    local = manifest_pattern(str(scratch / name), write_shards(
                        scratch / "tree", scratch / name, **kwargs))
                    remote = manifest_pattern(f"s3://bench/{name}", write_shards(
                        scratch / "tree", f"s3://bench/{name}", **kwargs))
                    sets.append((f"short side {side}" if side else "500x375", local, remote))
            sizes = {label: np.mean([len(b) for b in shard_blobs(local)]) / 1024
                     for label, local, _ in sets}

            def data(pattern, decoder="pil"):
                return DataConfig(train_urls=pattern, loader_workers=args.workers, decoder=decoder)

            for index, (label, local, remote) in enumerate(sets):
                blobs = shard_blobs(local)
                half_blobs = blobs[: len(blobs) // 2]
                decoders = ("pil", "simplejpeg")
                for decoder in decoders:
                    rows[f"tight loop, {decoder}, {label}"] = (
                        lambda b=blobs, d=decoder: tight_loop(b, args.img_size, data(local, d)),
                        lambda b=half_blobs, d=decoder: tight_loop(b, args.img_size, data(local, d)))
                if index == 0:
                    rows[f"our loader, local, pil, {label}"] = (
                        lambda p=local: loader_run(data(p), args.img_size, args.batch),
                        lambda p=first_half(local): loader_run(data(p), args.img_size, args.batch))
                for decoder in decoders:
                    rows[f"our loader, S3, {decoder}, {label}"] = (
                        lambda p=remote, d=decoder: loader_run(data(p, d), args.img_size, args.batch),
                        lambda p=first_half(remote), d=decoder: loader_run(data(p, d), args.img_size,
                                                                           args.batch))
                if index == 0 and not args.no_wds:
                    for how in ("aws", "curl"):
                        urls = pipe_urls(remote, endpoint, how)
                        rows[f"webdataset, S3 pipe:{how}, pil, {label}"] = (
                            lambda u=urls: wds_run(u, args.img_size, args.batch, args.workers,
                                                   data(local)),
                            lambda u=urls[: len(urls) // 2]: wds_run(u, args.img_size, args.batch,
                                                                     args.workers, data(local)))
            best: dict[str, list] = {name: [None, None] for name in rows}
            for round_index in range(args.rounds):
                for name, runs in rows.items():
                    for which, run in enumerate(runs):
                        result = run()
                        if best[name][which] is None or result[1] < best[name][which][1]:
                            best[name][which] = result
                print(f"round {round_index + 1}/{args.rounds} done, load average "
                      f"{os.getloadavg()[0]:.1f}", file=sys.stderr)
    finally:
        server.terminate()
        server.wait()
    print(f"{args.images} JPEGs ({', '.join(f'{k}: mean {v:.0f} KB' for k, v in sizes.items())}), "
          f"crop {args.img_size}px, batch {args.batch}, {args.workers} loader workers, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, best of {args.rounds} "
          f"rounds, S3 at {endpoint}")
    print(f"| pipeline | images | CPU s | wall s | img/CPU-s | vs (a) | steady img/CPU-s | vs (a) "
          f"| vs own tight loop, whole / steady | cores per GPU at {GPU_IMAGES_PER_S:,} img/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base_name = next(iter(rows))
    base = best[base_name][0][0] / best[base_name][0][1]
    base_steady = steady_rate(*best[base_name])
    for name, (whole, half) in best.items():
        rate, rate_steady = whole[0] / whole[1], steady_rate(whole, half)
        own = own_tight_loop(name, best)
        against = (f"{rate / (own[0][0] / own[0][1]):.0%} / {rate_steady / steady_rate(*own):.0%}"
                   if own else "")
        print(f"| {name} | {whole[0]} | {whole[1]:.2f} | {whole[2]:.2f} | {rate:.1f} | "
              f"{rate / base:.0%} | {rate_steady:.1f} | {rate_steady / base_steady:.0%} | "
              f"{against} | {GPU_IMAGES_PER_S / rate_steady:.1f} |")


def own_tight_loop(name: str, best: dict):
    """(whole, half) of the tight loop with a loader row's decoder and shards; None otherwise."""
    if not name.startswith("our loader"):
        return None
    *_, decoder, shards = name.split(", ")
    return best.get(f"tight loop, {decoder}, {shards}")


def steady_rate(whole, half) -> float:
    """Images per CPU-s of the second half alone: all minus the first half."""
    return (whole[0] - half[0]) / (whole[1] - half[1])


if __name__ == "__main__":
    main()
