"""BatchAugment per batch: aten calls, CPU milliseconds and (on CUDA) images/s, default recipe.

    .venv/bin/python benchmarks/augment_calls.py                    # batch 16 and 128, 224 px
    .venv/bin/python benchmarks/augment_calls.py --threads 1
    git show <rev>:t2t_dist/data/augment.py > /tmp/augment_rev.py   # another version, same figures
    .venv/bin/python benchmarks/augment_calls.py --module /tmp/augment_rev.py

Aten calls: every CPU profiler event whose name starts with ``aten::`` during one forward,
nested ones included (an ``aten::where`` that calls ``aten::empty`` counts twice), mean of
``--reps`` batches after a warm-up batch (a version whose calls depend on the draws varies);
``top-level`` counts only those not inside another aten call. CPU ms: median
of ``--reps`` batches. CUDA images/s: 4 ``--reps`` batches between two synchronisations; one
forward under ``torch.cuda.set_sync_debug_mode("error")`` tells whether it syncs the host.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from t2t_dist.config import DataConfig


def load_batch_augment(path: str | None):
    if path is None:
        from t2t_dist.data import BatchAugment
        return BatchAugment
    spec = importlib.util.spec_from_file_location("augment_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BatchAugment


def random_batch(batch: int, img_size: int, device: torch.device):
    images = torch.randint(0, 256, (batch, 3, img_size, img_size), dtype=torch.uint8, device=device)
    return images, torch.randint(0, 1000, (batch,), device=device)


def aten_calls(augment, images, labels, reps: int) -> tuple[float, float]:
    """(all aten events, top-level aten events) per forward on the CPU, mean of ``reps``."""
    augment(images, labels)  # warm-up: lazy initialisation stays out of the count
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            augment(images, labels)
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    nested = {id(child) for e in events for child in e.cpu_children if child.name.startswith("aten::")}
    return len(events) / reps, sum(id(e) not in nested for e in events) / reps


def cpu_ms(augment, images, labels, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        augment(images, labels)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def cuda_images_per_s(augment, batch: int, img_size: int, reps: int) -> tuple[float, bool]:
    """(images/s, whether a forward synchronises the host with the GPU)."""
    device = torch.device("cuda")
    images, labels = random_batch(batch, img_size, device)
    augment = augment.to(device)
    for _ in range(3):
        augment(images, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        augment(images, labels)
        syncs = False
    except RuntimeError:
        syncs = True
    torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        augment(images, labels)
    torch.cuda.synchronize()
    return batch * reps / (time.perf_counter() - start), syncs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[16, 128])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--module", help="a file defining BatchAugment (default: t2t_dist's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    augment = load_batch_augment(args.module)(DataConfig(), num_classes=1000)
    print(f"{args.img_size} px, default recipe, {torch.get_num_threads()} CPU threads")
    for batch in args.batches:
        images, labels = random_batch(batch, args.img_size, torch.device("cpu"))
        calls, top_level = aten_calls(augment, images, labels, args.reps)
        line = (f"batch {batch:4d}: {calls:7.0f} aten calls ({top_level:.0f} top-level), "
                f"CPU {cpu_ms(augment, images, labels, args.reps):8.1f} ms/batch")
        if torch.cuda.is_available():
            per_s, syncs = cuda_images_per_s(augment, batch, args.img_size, 4 * args.reps)
            line += f", CUDA {per_s:8.0f} img/s ({'host syncs' if syncs else 'no host sync'})"
            augment = augment.cpu()
        print(line, flush=True)


if __name__ == "__main__":
    main()
