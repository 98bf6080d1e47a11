"""Images/s of a full training step (forward, backward, AdamW) per attention path, eager vs compiled.

    .venv/bin/python benchmarks/model_step.py --model t2t_vit_7 --batch 16
    .venv/bin/python benchmarks/model_step.py --model t2t_vit_14 --device cuda --precision bf16 --batch 128

With default arguments it measures, side by side in one run: the reference math
(``attention=eager``) and our default path (``attention=sdpa``), each uncompiled and compiled,
and prints each one's speed relative to the uncompiled reference. Timed rounds interleave the
configurations and the best round counts, so load from other processes skews them alike.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from t2t_dist.models import create_model, list_models

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="t2t_vit_7", choices=list_models())
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--precision", choices=list(DTYPES), default=None,
                        help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--attention", choices=["eager", "sdpa", "both"], default="both")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="only compiled (--compile) or only eager (--no-compile); default both")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best one is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation included)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    parser.add_argument("--profile", action="store_true",
                        help="also print where one step's time goes (torch.profiler), per configuration")
    return parser.parse_args(argv)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One configuration: model, AdamW, fixed batch; ``run(steps)`` returns images per second."""

    def __init__(self, args, device: torch.device, attention: str, compiled: bool) -> None:
        torch.manual_seed(0)
        self.args, self.device = args, device
        self.model = create_model(args.model, img_size=args.img_size, attention=attention,
                                  drop_path_rate=0.1).to(device).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                           lr=1e-4, fused=device.type == "cuda")
        self.forward = torch.compile(self.model) if compiled else self.model
        self.images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
        self.labels = torch.randint(0, self.model.config.num_classes, (args.batch,), device=device)
        self.dtype = DTYPES[args.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)

    def step(self) -> None:
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            loss = F.cross_entropy(self.forward(self.images), self.labels)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, steps: int) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        synchronize(self.device)
        return self.args.batch * steps / (time.perf_counter() - start)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    if args.threads:
        torch.set_num_threads(args.threads)
    attentions = ["eager", "sdpa"] if args.attention == "both" else [args.attention]
    compiles = [False, True] if args.compile is None else [args.compile]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"{args.model}  batch {args.batch}  {args.img_size}px  {args.precision}  {name}  "
          f"torch {torch.__version__}  best of {args.rounds} rounds x {args.steps} steps")
    trainers = {}
    for compiled in compiles:
        for attention in attentions:
            trainer = Trainer(args, device, attention, compiled)
            start = time.perf_counter()
            for _ in range(args.warmup):
                trainer.step()  # compiles on the first call
            print(f"  warmed up attention={attention} compiled={compiled} "
                  f"in {time.perf_counter() - start:.0f} s", flush=True)
            trainers[attention, compiled] = trainer
    # Rounds interleave the configurations so that load from elsewhere hits them alike.
    rates = {key: [] for key in trainers}
    for _ in range(args.rounds):
        for key, trainer in trainers.items():
            rates[key].append(trainer.run(args.steps))
    base = max(next(iter(rates.values())))
    print(f"\n{'attention':<10} {'compiled':<9} {'img/s best':>10} {'median':>8} {'vs first':>9}")
    for (attention, compiled), values in rates.items():
        best = max(values)
        print(f"{attention:<10} {str(compiled):<9} {best:>10.1f} {statistics.median(values):>8.1f} "
              f"{best / base:>8.2f}x")
    if args.profile:
        for (attention, compiled), trainer in trainers.items():
            print(f"\n{attention} compiled={compiled}: {profile_shares(trainer)}")


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}


def profile_shares(trainer: Trainer) -> str:
    """Share of one step's self CPU/CUDA time: matmuls, the AdamW update, everything else."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function("forward_backward"):
            trainer.step()
        synchronize(trainer.device)
    events = [e for e in prof.key_averages() if e.key != "forward_backward"]
    total = sum(e.self_cpu_time_total for e in events) or 1
    matmul = sum(e.self_cpu_time_total for e in events
                 if e.key in MATMUL_OPS or "scaled_dot_product" in e.key)
    # The optimizer's inclusive time: every op it runs, whatever its name.
    optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step"))
    return (f"matmul/attention kernels {100 * matmul / total:.0f}%, AdamW update "
            f"{100 * optimizer / total:.0f}%, everything else {100 * (total - matmul - optimizer) / total:.0f}%")


if __name__ == "__main__":
    main()
