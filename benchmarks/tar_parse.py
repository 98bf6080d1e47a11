"""Tar parsing rate, samples per second, of the same shard bytes by three readers:

  ours        ``t2t_dist.data.tar.parse_tar_samples`` (hand-written ustar fast path)
  tarfile     ``tarfile.open(mode="r|")`` + grouping by key (what our reader falls back to)
  webdataset  ``tar_file_iterator`` + ``group_by_keys`` (what ``shards check`` streams with)

on runs of ``--run`` consecutive samples (the loader's Range reads: one run per shard per
batch, about micro_batch / shard_interleave samples) and on the whole shard. The shard is
written by webdataset's ``TarWriter`` as ``write_shards`` writes it (mtime 0: plain ustar
headers); ``--pax`` writes it with TarWriter's default mtime instead, which puts a PAX header
before every member and sends our reader to its tarfile fallback. Samples are ImageNet-sized:
``--jpeg-kb`` of random bytes (the mean ImageNet JPEG is ~110 KB), a cls and a json member.
One process, best of ``--repeats``.

    .venv/bin/python benchmarks/tar_parse.py
    .venv/bin/python benchmarks/tar_parse.py --pax
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import webdataset
from webdataset.tariterators import group_by_keys, tar_file_iterator

from t2t_dist.data.tar import _samples_with_tarfile, parse_tar_samples, split_member


def make_shard(samples: int, jpeg_kb: int, *, pax: bool) -> tuple[bytes, list[int]]:
    """Shard bytes and each sample's offset (+ the end), as write_shards records them."""
    buffer, offsets = io.BytesIO(), []
    with webdataset.TarWriter(buffer, encoder=False, **({} if pax else {"mtime": 0})) as writer:
        for index in range(samples):
            offsets.append(writer.tarstream.offset)
            writer.write({"__key__": f"n{index:08d}", "jpg": os.urandom(jpeg_kb * 1024),
                          "cls": str(index % 1000).encode(),
                          "json": json.dumps({"label": index % 1000}).encode()})
        offsets.append(writer.tarstream.offset)
    return buffer.getvalue(), offsets


def with_webdataset(data: bytes) -> list[dict]:
    members = ({**m, "__url__": ""} for m in tar_file_iterator(io.BytesIO(data)))
    return list(group_by_keys(members, keys=split_member))


READERS = {"ours": parse_tar_samples, "tarfile": _samples_with_tarfile,
           "webdataset": with_webdataset}


def rate(reader, chunks: list[bytes], samples: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for chunk in chunks:
            reader(chunk)
        best = min(best, time.perf_counter() - started)
    return samples / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=512, help="samples in the shard")
    parser.add_argument("--run", type=int, default=16, help="samples per range read")
    parser.add_argument("--jpeg-kb", type=int, default=110)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pax", action="store_true", help="TarWriter's default mtime: PAX headers")
    args = parser.parse_args()
    data, offsets = make_shard(args.samples, args.jpeg_kb, pax=args.pax)
    runs = [data[offsets[i]:offsets[min(i + args.run, args.samples)]]
            for i in range(0, args.samples, args.run)]
    expected = parse_tar_samples(data)
    for name, reader in READERS.items():  # same samples from every reader
        got = [{k: v for k, v in s.items() if not k.startswith("__")} for s in reader(data)]
        assert got == expected, name
    headers = "PAX (TarWriter default mtime)" if args.pax else "ustar (TarWriter mtime=0)"
    print(f"{args.samples} samples of {args.jpeg_kb} KB + cls + json, {headers}; samples/s, "
          f"best of {args.repeats}")
    print(f"{'reader':<12} {'runs of ' + str(args.run):>12} {'ours is':>8} {'whole shard':>12} "
          f"{'ours is':>8}")
    ours: tuple[float, float] | None = None
    for name, reader in READERS.items():
        on_runs = rate(reader, runs, args.samples, args.repeats)
        whole = rate(reader, [data], args.samples, args.repeats)
        ours = ours or (on_runs, whole)
        print(f"{name:<12} {on_runs:>12,.0f} {ours[0] / on_runs:>7.1f}x {whole:>12,.0f} "
              f"{ours[1] / whole:>7.1f}x")

if __name__ == "__main__":
    main()
