"""What pre-resized shards do to accuracy: the demo job trained on the same images both ways.

The digits demo images are written at ``--source-size`` px (64: twice the 32 px the demo
trains at, about the ratio of a 500x375 ImageNet photo to a 224 crop) and sharded twice:
as they are, and with ``shards write --max-side`` at ``ceil(img_size * 256 / 224)`` (37 px:
FFCV's short side 256 for 224 crops, scaled to the demo). Each training set is validated on
its own validation shards, written the same way (what a user of ``--max-side`` does). Every
(shards, seed) pair runs ``jobs/pretrain.py --config jobs/configs/demo.yaml`` as a user
types it, with ``data.seed`` and ``run.seed`` set to the seed; the last line of each run
gives val top-1 / top-5 / EMA top-1.

    .venv/bin/python benchmarks/preresize_accuracy.py                  # 2 seeds, ~3.5 min on 2 cores
    .venv/bin/python benchmarks/preresize_accuracy.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FINISHED = re.compile(r"finished \S+: step (\d+), val/top1 ([\d.]+), val/top5 ([\d.]+), "
                      r"val_ema/top1 ([\d.]+)")


def write_variants(root: Path, source_size: int, max_side: int) -> dict[str, dict[str, str]]:
    """{"full": {"train": pattern, "val": pattern}, "pre-resized": {...}} of one digits tree."""
    from t2t_dist.data import manifest_pattern, write_shards
    from t2t_dist.data.digits import write_digits_folders

    folders = write_digits_folders(root / "images", img_size=source_size)
    variants = {}
    for name, side in (("full", None), ("pre-resized", max_side)):
        variants[name] = {}
        for split, folder in folders.items():
            dest = root / name / split
            manifest = write_shards(folder, dest, prefix=f"digits-{split}", samples_per_shard=200,
                                    max_side=side, shuffle_seed=0)
            variants[name][split] = manifest_pattern(str(dest), manifest)
    return variants


def train(urls: dict[str, str], seed: int, scratch: Path, name: str) -> tuple[float, ...]:
    """(step, val top-1, top-5, EMA top-1) of one demo run on ``urls``."""
    command = [sys.executable, "jobs/pretrain.py", "--config", "jobs/configs/demo.yaml",
               "--set", f"data.train_urls={urls['train']}", "--set", f"data.val_urls={urls['val']}",
               "--set", f"data.seed={seed}", "--set", f"run.seed={seed}",
               "--set", f"run.name={name}", "--set", f"run.storage_path={scratch / 'runs'}",
               "--set", f"run.tracking_uri=sqlite:///{scratch / 'mlflow.db'}",
               "--set", "run.log_model=false", "--set", "scaling.ray_address=local"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    found = FINISHED.search(done.stdout)
    if done.returncode or not found:
        raise SystemExit(f"{name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return tuple(float(value) for value in found.groups())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--source-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=32, help="the demo's model.img_size")
    args = parser.parse_args()
    max_side = math.ceil(args.img_size * 256 / 224)

    results: dict[str, list[tuple[float, ...]]] = {}
    with tempfile.TemporaryDirectory(prefix="preresize-") as scratch:
        scratch = Path(scratch)
        variants = write_variants(scratch, args.source_size, max_side)
        for seed in args.seeds:  # interleaved, so a change in machine load hits both alike
            for name, urls in variants.items():
                result = train(urls, seed, scratch, f"{name}-seed{seed}")
                results.setdefault(name, []).append(result)
                print(f"{name}, seed {seed}: step {result[0]:.0f}, val top-1 {result[1]:.2f}, "
                      f"top-5 {result[2]:.2f}, EMA top-1 {result[3]:.2f}", file=sys.stderr)

    print(f"digits at {args.source_size} px, demo at {args.img_size} px, pre-resized: short side "
          f"{max_side}; seeds {args.seeds}")
    print("| shards | val top-1 (each seed) | mean | val top-5 mean | EMA top-1 mean |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        label = f"as written ({args.source_size} px)" if name == "full" else \
            f"`--max-side {max_side}`"
        print(f"| {label} | {', '.join(f'{row[1]:.2f}' for row in rows)} | "
              f"{statistics.mean(row[1] for row in rows):.2f} | "
              f"{statistics.mean(row[2] for row in rows):.2f} | "
              f"{statistics.mean(row[3] for row in rows):.2f} |")


if __name__ == "__main__":
    main()
