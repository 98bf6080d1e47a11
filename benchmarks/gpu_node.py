"""One GPU, one command: the training path's speed from the model alone to the whole path fed
by the loader, and what the full recipe would cost at that speed.

    python benchmarks/gpu_node.py                          # one CUDA GPU: t2t_vit_14, 224 px, bf16
    python benchmarks/gpu_node.py --device cpu --quick     # every row at toy size: does it run

Rows, each measured in this one process (no Ray; DeepSpeed on a one-rank process group):
  model alone     plain AMP step, fused AdamW, soft targets: ours (sdpa) compiled and not,
                  ``attention=eager`` (the authors' math) uncompiled, timm's DeiT-S compiled
                  when timm is installed; images/s and MFU where the GPU's peak is known
  engine          ``build_engine`` per ZeRO stage against the plain step, uncompiled, and
                  the default stage compiled against the plain compiled step (ms/step)
  augment         ``BatchAugment`` alone, the default recipe, on uint8 batches on the device
  loader          our shard loader alone per decoder, from local shards of 500x375 JPEGs
  end to end      a run's step fed by the loader, per decoder: the engine at the default ZeRO
                  stage (compiled), the sample ledger, ``BatchAugment`` and ``loop.train_step``
and the GPU-hours of 310 epochs of ImageNet-1k (1,281,167 images) at the end-to-end rate.
The whole run takes 3-5 minutes on an H200 (compilation included).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from input_pipeline import photo_like_jpegs  # noqa: E402  (the same ImageNet-like photos)

from t2t_dist.config import DataConfig, load_config  # noqa: E402
from t2t_dist.data import BatchAugment, build_train_loader, manifest_pattern, write_shards  # noqa: E402
from t2t_dist.checkpoint import SampleLedger  # noqa: E402
from t2t_dist.engine import build_optimizer, engine_dtype  # noqa: E402
from t2t_dist.loop import soft_target_cross_entropy, train_step  # noqa: E402
from t2t_dist.models import count_macs, create_model  # noqa: E402

IMAGENET_TRAIN_IMAGES = 1_281_167
RECIPE_EPOCHS = 310
# Dense bf16 peak FLOP/s by device name, for MFU (SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="t2t_vit_14")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--loader-workers", type=int, default=max(1, (os.cpu_count() or 2) - 4))
    parser.add_argument("--images", type=int, default=2048, help="photos in the local shards")
    parser.add_argument("--decoders", nargs="+", default=None,
                        help="default: simplejpeg, and cuda on a GPU")
    parser.add_argument("--zero-stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--quick", action="store_true",
                        help="toy sizes, nothing compiled: checks that every row runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.img_size, args.batch, args.steps, args.images = "t2t_vit_mini", 32, 8, 2, 64
        args.loader_workers = 1
    args.compile = not args.quick
    if args.decoders is None:
        args.decoders = ["simplejpeg"] + (["cuda"] if args.device.startswith("cuda") else [])
    return args


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, steps: int, device: torch.device, warmup: int = 3) -> float:
    """Median seconds per call of ``step`` after ``warmup`` calls (compilation included there)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PlainStep:
    """The plain AMP training step: autocast forward, soft-target loss, backward, fused AdamW."""

    def __init__(self, model: torch.nn.Module, device: torch.device, compiled: bool):
        self.model = model.to(device).train()
        self.optimizer = build_optimizer(self.model, load_config().optim)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.device = device

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = soft_target_cross_entropy(self.forward(images).float(), targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def synthetic(batch: int, img_size: int, num_classes: int, device: torch.device):
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    targets = torch.softmax(torch.randn(batch, num_classes, device=device), dim=-1)
    return images, targets


def model_rows(args, device: torch.device) -> dict[str, float]:
    """Images/s of the plain step per model path."""
    rows = {}
    batch = synthetic(args.batch, args.img_size, 1000, device)
    paths = [("ours (sdpa), uncompiled", "sdpa", False), ("attention=eager, uncompiled", "eager", False)]
    if args.compile:
        paths.insert(0, ("ours (sdpa), compiled", "sdpa", True))
    for label, attention, compiled in paths:
        torch.manual_seed(0)
        step = PlainStep(create_model(args.model, img_size=args.img_size, attention=attention,
                                      drop_path_rate=0.1), device, compiled)
        rows[label] = args.batch / timed(lambda: step(*batch), args.steps, device)
        del step
        release()
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and args.compile and args.img_size == 224:
        step = PlainStep(timm.create_model("vit_small_patch16_224", drop_path_rate=0.1), device, True)
        rows["timm DeiT-S (vit_small_patch16_224), compiled"] = args.batch / timed(
            lambda: step(*batch), args.steps, device)
        del step
        release()
    return rows


@contextlib.contextmanager
def one_rank_group(device: torch.device):
    """A one-rank process group (NCCL on a GPU, gloo on a CPU) for DeepSpeed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


def default_engine(args, device: torch.device, compiled: bool):
    """``build_engine`` at the config's default ZeRO stage and precision, as a run builds it."""
    from t2t_dist.engine import build_engine

    config = load_config(overrides=[
        f"model.name={args.model}", f"model.img_size={args.img_size}",
        f"model.compile={str(compiled).lower()}", "model.drop_path_rate=0.1",
        f"data.global_batch={args.batch}"])
    torch.manual_seed(0)
    return build_engine(create_model(args.model, img_size=args.img_size, drop_path_rate=0.1),
                        config, world_size=1, device=device)


def engine_rows(args, device: torch.device) -> dict[str, float]:
    """Seconds per step: the plain step and ``build_engine`` per ZeRO stage, bf16."""
    from t2t_dist.engine import build_engine, set_lr

    images, targets = synthetic(args.batch, args.img_size, 1000, device)
    rows = {}
    default_stage = load_config().engine.zero_stage
    cases = [(stage, False) for stage in args.zero_stages]
    if args.compile:
        cases.append((default_stage, True))
    for compiled in sorted({compiled for _, compiled in cases}):
        torch.manual_seed(0)
        plain = PlainStep(create_model(args.model, img_size=args.img_size, drop_path_rate=0.1),
                          device, compiled)
        rows[f"plain step{', compiled' if compiled else ''}"] = timed(lambda: plain(images, targets),
                                                                     args.steps, device)
        del plain
        release()
    for stage, compiled in cases:
        config = load_config(overrides=[
            f"model.name={args.model}", f"model.img_size={args.img_size}",
            f"model.compile={str(compiled).lower()}", "model.drop_path_rate=0.1",
            f"data.global_batch={args.batch}", f"engine.zero_stage={stage}",
            "engine.precision=bf16"])
        torch.manual_seed(0)
        engine = build_engine(create_model(args.model, img_size=args.img_size, drop_path_rate=0.1),
                              config, world_size=1, device=device)
        inputs = images.to(engine_dtype(engine))

        def step():
            set_lr(engine, 1e-3)
            loss = soft_target_cross_entropy(engine(inputs).float(), targets)
            engine.backward(loss)
            engine.step()

        label = f"engine ZeRO-{stage}{', compiled' if compiled else ''}"
        rows[label] = timed(step, args.steps, device)
        del engine, step
        release()
    return rows


def augment_rate(args, device: torch.device) -> float:
    """Images/s of ``BatchAugment`` (default recipe) on uint8 batches already on the device."""
    augment = BatchAugment(DataConfig(), 1000).to(device)
    images = torch.randint(0, 256, (args.batch, 3, args.img_size, args.img_size), dtype=torch.uint8,
                           device=device)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    return args.batch / timed(lambda: augment(images, labels), args.steps, device)


def make_shards(root: Path, images: int) -> str:
    photo_like_jpegs(root / "photos", images)
    manifest = write_shards(root / "photos", str(root / "shards"), prefix="photos",
                            samples_per_shard=256)
    return manifest_pattern(str(root / "shards"), manifest)


def batches_forever(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def loader_rate(args, urls: str, decoder: str, device: torch.device, consume=None) -> float:
    """Images/s of the loader (or of ``consume`` fed by it) over ``args.steps`` batches after 3."""
    config = DataConfig(train_urls=urls, loader_workers=args.loader_workers, decoder=decoder)
    batches = batches_forever(build_train_loader(config, img_size=args.img_size, micro_batch=args.batch))
    for _ in range(3):  # workers started, first batches compiled through
        images, labels = next(batches)
        if consume is not None:
            consume(images, labels)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        images, labels = next(batches)
        if consume is not None:
            consume(images, labels)
    synchronize(device)
    elapsed = time.perf_counter() - started
    batches.close()
    return args.batch * args.steps / elapsed


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model} at {args.img_size} px, batch {args.batch}, bf16, {name}, torch "
          f"{torch.__version__}, {args.loader_workers} loader workers, median of {args.steps} steps",
          flush=True)
    started = time.perf_counter()
    flops_per_image = 3 * 2 * count_macs(args.model, args.img_size)  # forward + backward
    peak = next((value for key, value in PEAK_BF16.items() if key in name), None)

    print("\n| model alone (plain AMP step) | images/s | MFU |\n|---|---|---|")
    models = model_rows(args, device)
    for label, rate in models.items():
        mfu = (f"{100 * rate * flops_per_image / peak:.1f}%" if peak and label.startswith("ours")
               else "")
        print(f"| {label} | {rate:,.0f} | {mfu} |", flush=True)

    with one_rank_group(device):  # one for the whole run: DeepSpeed keeps its first group
        print("\n| engine step | ms/step | vs plain |\n|---|---|---|")
        steps = engine_rows(args, device)
        for label, seconds in steps.items():
            plain = steps["plain step, compiled" if "compiled" in label else "plain step"]
            print(f"| {label} | {seconds * 1e3:.1f} | {seconds / plain:.2f}x |", flush=True)

        print("\n| input | images/s |\n|---|---|")
        print(f"| BatchAugment alone (default recipe) | {augment_rate(args, device):,.0f} |",
              flush=True)
        end_to_end = {}
        with tempfile.TemporaryDirectory(prefix="t2t-gpu-node-") as root:
            urls = make_shards(Path(root), args.images)
            for decoder in args.decoders:
                rate = loader_rate(args, urls, decoder, device)
                print(f"| loader alone, {decoder} | {rate:,.0f} |",
                      flush=True)
            # What a run does per step: the engine at the default stage, the sample ledger,
            # BatchAugment and train_step (loop.fit's step without its logging cadence).
            engine = default_engine(args, device, args.compile)
            augment = BatchAugment(DataConfig(), 1000).to(device)
            ledger = SampleLedger()

            def train_on(images, labels):
                ledger.add(0, [(images, labels)])
                train_step(engine, [(images, labels)], augment=augment, lr=1e-3, device=device,
                           dtype=engine_dtype(engine))

            for decoder in args.decoders:
                end_to_end[decoder] = loader_rate(args, urls, decoder, device, consume=train_on)
                print(f"| end to end, engine ZeRO-{engine.zero_optimization_stage()}"
                      f"{', compiled' if args.compile else ''}, {decoder} | "
                      f"{end_to_end[decoder]:,.0f} |", flush=True)
            del engine

    best = max(end_to_end.values())
    hours = RECIPE_EPOCHS * IMAGENET_TRAIN_IMAGES / best / 3600
    print(f"\nfull recipe ({RECIPE_EPOCHS} epochs of ImageNet-1k) at {best:,.0f} images/s: "
          f"{hours:,.0f} GPU-hours; at the model's own speed "
          f"({max(models.values()):,.0f} images/s): "
          f"{RECIPE_EPOCHS * IMAGENET_TRAIN_IMAGES / max(models.values()) / 3600:,.0f}")
    print(f"({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
