"""The training loop: ``train_step``, ``evaluate`` and ``fit``, which reads top to bottom.

``fit(config, parts)`` calls checkpointing, evaluation and logging explicitly. ``TrainParts``
is everything built for it (engine, loaders, augmentation, schedule, sample ledger, EMA, a
checkpointer that knows how to hand a checkpoint to Ray Train, a tracker with the ``Tracker``
methods); this module imports neither tracking nor launch (nor ray).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from t2t_dist import dist
from t2t_dist.checkpoint import Checkpointer, SampleLedger
from t2t_dist.config import Config, DataConfig, ScalingConfig
from t2t_dist.data import normalize
from t2t_dist.engine import engine_dtype, full_named_tensors, set_lr
from t2t_dist.optim import LRSchedule, WeightEma


class Tracker(Protocol):
    """What the workers call on a tracker (MLflow on rank 0, a no-op elsewhere)."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_model(self, model: nn.Module, name: str = "model", **kwargs: Any) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


@dataclass
class TrainParts:
    """What ``fit`` trains with, built once per worker (``launch.build.build_parts``).

    ``ledger`` counts the samples trained on and is one of the checkpointer's states, as are
    the training loader and the EMA. ``ema_model`` is the fp32 module the EMA weights are
    evaluated in.
    """

    device: torch.device
    engine: Any  # deepspeed.DeepSpeedEngine
    train_loader: Any
    val_loader: Any
    augment: nn.Module
    schedule: LRSchedule
    ledger: SampleLedger
    checkpointer: Checkpointer
    tracker: Tracker
    ema: WeightEma | None = None
    ema_model: nn.Module | None = None


def steps_per_epoch(train_loader, engine) -> int:
    """Optimizer steps per epoch: the rank's batches per epoch over the accumulation steps."""
    return len(train_loader) // engine.gradient_accumulation_steps()


def planned_steps(config: Config, train_samples: int) -> int:
    """The optimizer steps a run of ``config`` trains in all, from the training set's size
    alone (no loader, no engine): ``optim.epochs`` of ``train_samples // data.global_batch``
    steps (every step one full global batch, as the loaders give them), or ``run.max_steps``
    when fewer. What ``fit`` trains; the driver asks it whether a run already ended."""
    schedule = config.optim.epochs * (train_samples // config.data.global_batch)
    return min(schedule, config.run.max_steps or schedule)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))``; both (B, C)."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def micro_batch_seeds(seed: int, step: int, accum: int) -> list[int]:
    """This rank's seed for each of its ``accum`` micro batches of optimizer step ``step``.

    A step's global batch is micro batches ``j = 0, 1, ...`` and micro batch ``j`` goes to
    rank ``j % world_size`` (``data.order``), so this rank's ``i``-th is ``j = i * world +
    rank``. Seeding each from ``(seed, step, j)`` makes its random draws (augmentation,
    dropout, drop path) the same whichever worker trains it: a group of another size (an
    elastic shrink or regrow, a resubmission on fewer workers) continues the same run.
    """
    rank, world = dist.rank(), dist.world_size()
    return [int(np.random.SeedSequence([seed, step, index * world + rank]).generate_state(1)[0])
            for index in range(accum)]


def train_step(engine, micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
               augment: nn.Module, lr: float, device: torch.device,
               dtype: torch.dtype, seeds: Sequence[int] | None = None) -> torch.Tensor:
    """One optimizer step over ``micro_batches`` (gradient accumulation); the mean loss.

    Images arrive as uint8 (B, 3, H, W) on the CPU; ``augment`` turns them into float images
    and soft targets (B, C) on ``device``. DeepSpeed steps the optimizer on the last micro batch.
    ``seeds`` (``micro_batch_seeds``): each micro batch draws its randomness from a generator
    seeded so, leaving the process's stream where it was; None: from the process's stream.
    """
    set_lr(engine, lr)
    total = torch.zeros((), device=device)
    for index, (images, labels) in enumerate(micro_batches):
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                   enabled=seeds is not None):
            if seeds is not None:
                torch.manual_seed(seeds[index])
            images, targets = augment(images.to(device, non_blocking=True),
                                      labels.to(device, non_blocking=True))
            logits = engine(images.to(dtype))
            loss = soft_target_cross_entropy(logits.float(), targets)
            engine.backward(loss)
        engine.step()
        total += loss.detach()
    return total / len(micro_batches)


@torch.no_grad()
@torch.random.fork_rng(devices=[])  # evaluation never shifts the training RNG stream
def evaluate(model: nn.Module, loader, *, data: DataConfig, device: torch.device,
             dtype: torch.dtype = torch.float32,
             autocast: torch.dtype | None = None) -> dict[str, float]:
    """Loss, top-1 and top-5 (%) over the whole validation set, summed over ranks. Images are
    cast to ``dtype``; the forward runs under ``torch.autocast(autocast)`` unless it is None.

    Padding samples (label -1, which keep ranks at equal batch counts) are left out.
    Every rank must call this: ZeRO-3 gathers parameters in the forward.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, count
    for images, labels in loader:
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = model(normalize(images.to(device), data).to(dtype)).float()  # (B, C)
        labels = labels.to(device)
        keep = labels >= 0
        logits, labels = logits[keep], labels[keep]
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels[:, None]
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                             top[:, 0].sum().double(), top.any(dim=-1).sum().double(),
                             torch.tensor(float(labels.numel()), device=device, dtype=torch.float64)])
    dist.all_reduce_sum(sums)
    model.train(was_training)
    loss, top1, top5, count = sums.tolist()
    count = max(count, 1.0)
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count}


@dataclass
class Meter:
    """Loss and throughput since the last log line, and since the start for the ETA."""

    start_step: int
    started: float = field(default_factory=time.perf_counter)
    window_started: float = field(default_factory=time.perf_counter)
    loss_sum: Any = 0.0
    steps: int = 0
    images: int = 0

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum = self.loss_sum + loss  # stays a tensor: no host sync per step
        self.steps += 1
        self.images += images

    def flush(self, step: int, total_steps: int, device: torch.device) -> dict[str, float]:
        """Window means over ranks: loss, images/s per worker and in total, ETA (s).

        Throughput and ETA go without a ``train/`` prefix: the MLflow UI shows metrics in
        sections by prefix, in order, the unprefixed last, so ``train/`` holds loss and LR."""
        elapsed = time.perf_counter() - self.window_started
        sums = torch.tensor([float(self.loss_sum), float(self.steps), self.images / elapsed],
                            dtype=torch.float64, device=device)
        dist.all_reduce_sum(sums)  # loss and rates summed over ranks
        loss_sum, steps, images_per_s = sums.tolist()
        world = dist.world_size()
        per_step = (time.perf_counter() - self.started) / max(step - self.start_step, 1)
        self.loss_sum, self.steps, self.images = 0.0, 0, 0
        self.window_started = time.perf_counter()
        return {"train/loss": loss_sum / max(steps, 1), "images_per_s": images_per_s,
                "images_per_s_per_worker": images_per_s / world,
                "eta_s": per_step * (total_steps - step)}


def skipped_counts(loader, device: torch.device) -> dict[str, float]:
    """This epoch's bad-sample counts by kind, summed over ranks (same kinds on every rank)."""
    skipped = loader.skipped()
    counts = torch.tensor([float(v) for v in skipped.values()], dtype=torch.float64, device=device)
    dist.all_reduce_sum(counts)
    return {f"data/skipped_{kind}": value for kind, value in zip(skipped, counts.tolist())}


def format_progress(step: int, total_steps: int, epoch: int, lr: float,
                    metrics: dict[str, float]) -> str:
    """One compact progress line, e.g. ``step 120/3100 ep 2 loss 1.234 lr 1.2e-04 ...``."""
    eta = int(metrics.get("eta_s", 0))
    return (f"step {step}/{total_steps} | epoch {epoch} | loss {metrics['train/loss']:.4f} | "
            f"lr {lr:.2e} | {metrics['images_per_s']:.0f} img/s "
            f"({metrics['images_per_s_per_worker']:.0f}/worker) | "
            f"eta {eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s")


def check_finite(loss: float, step: int, precision: str) -> None:
    """Stop with the step named when the training loss is NaN or Inf (every rank sees it)."""
    if not math.isfinite(loss):
        hint = "lower optim.lr" + (" or use engine.precision=fp32" if precision != "fp32" else
                                   " or raise optim.warmup_epochs")
        raise FloatingPointError(f"training loss is {loss} at step {step}: {hint}")


class StopRequested(Exception):
    """``fit`` stopped early on request (``stop_requested``): every rank committed a
    checkpoint of ``step`` first, so the same run resumes there."""

    def __init__(self, step: int):
        super().__init__(f"stopped on request at step {step}, after its checkpoint")
        self.step = step


def stop_agreed(requested: Callable[[], bool], device: torch.device) -> bool:
    """Rank 0 asks ``requested()``; every rank gets its answer (a collective)."""
    flag = torch.tensor([float(dist.is_main() and requested())], dtype=torch.float64, device=device)
    dist.all_reduce_sum(flag)
    return bool(flag.item())


def next_micro_batches(batches: Iterator, count: int) -> list:
    """The next ``count`` batches, leaving the global RNG untouched.

    Starting a DataLoader iterator draws its base seed from the global torch RNG (our
    loaders seed crops themselves); without the fork a resumed run, which starts its
    iterator mid-epoch, would draw augmentations and dropout from a shifted stream.
    """
    with torch.random.fork_rng(devices=[]):
        return [next(batches) for _ in range(count)]


RESIZE_TAG = "t2t_dist.resize.step_{step:08d}"  # MLflow: when and why the group changed size


def resize_reason(saved_workers: int, workers: int, scaling: ScalingConfig) -> str:
    """Why a run resumes on another number of workers than its checkpoint was written by."""
    if scaling.min_workers and workers < saved_workers:
        return (f"the group lost workers (a worker or its node failed) and Ray Train restarted it "
                f"with what the cluster holds (scaling.min_workers={scaling.min_workers})")
    if scaling.min_workers and workers > saved_workers:
        return (f"the cluster has room again and Ray Train grew the group (toward "
                f"scaling.num_workers={scaling.num_workers})")
    return f"the run was submitted again with scaling.num_workers={scaling.num_workers}"


def fit(config: Config, parts: TrainParts, *, resume: dict[str, Any] | None = None,
        stop_requested: Callable[[], bool] | None = None) -> dict[str, float]:
    """Train until the schedule (or ``run.max_steps``) ends; returns the last metrics and
    ``step``, the step it ended at.

    ``resume`` is the client state ``Checkpointer.restore`` returned (step, epoch).
    Checkpoints go through ``parts.checkpointer.commit`` (every rank, a barrier).
    ``stop_requested`` (asked on rank 0 every ``run.stop_check_every`` steps): when it says
    yes, every rank commits a checkpoint of that step and ``StopRequested`` is raised.
    """
    engine, train_loader, device, tracker = (parts.engine, parts.train_loader, parts.device,
                                             parts.tracker)
    run = config.run
    accum = engine.gradient_accumulation_steps()
    micro_batch = engine.train_micro_batch_size_per_gpu()
    epoch_steps = steps_per_epoch(train_loader, engine)
    total_steps = min(parts.schedule.total_steps, run.max_steps or parts.schedule.total_steps)
    dtype = engine_dtype(engine)
    step = resume["step"] if resume else 0
    metrics: dict[str, float] = {}

    def run_eval() -> dict[str, float]:
        result = {f"val/{k}": v for k, v in evaluate(engine, parts.val_loader, data=config.data,
                                                     device=device, dtype=dtype).items()}
        if parts.ema is not None and parts.ema_model is not None:
            parts.ema_model.load_state_dict(parts.ema.shadow)
            result.update({f"val_ema/{k}": v for k, v in evaluate(
                parts.ema_model, parts.val_loader, data=config.data, device=device).items()})
        dist.say("eval  | " + " | ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    workers = dist.world_size()
    dist.say(f"training {config.model.name} for {total_steps} steps ({epoch_steps} per epoch) on "
             f"{workers} workers: micro batch {micro_batch} x accumulation {accum} x "
             f"workers {workers} = global batch {config.data.global_batch}"
         + (f", resumed at step {step}" if resume else ""))
    saved_workers = resume.get("resumed_world_size", workers) if resume else workers
    if saved_workers != workers:  # the checkpoint continues on another world size
        note = (f"workers {saved_workers} -> {workers} at step {step}: "
                f"{resize_reason(saved_workers, workers, config.scaling)}")
        dist.say(note)
        tracker.set_tags({RESIZE_TAG.format(step=step): note})
    meter = Meter(start_step=step)
    while step < total_steps:
        epoch = step // epoch_steps
        train_loader.set_epoch(epoch)  # keeps the position when resuming inside this epoch
        batches = iter(train_loader)
        epoch_end = min((epoch + 1) * epoch_steps, total_steps)
        while step < epoch_end:
            lr = parts.schedule(step)
            micro_batches = next_micro_batches(batches, accum)
            parts.ledger.add(epoch, micro_batches)  # samples seen, saved with each checkpoint
            loss = train_step(engine, micro_batches, augment=parts.augment, lr=lr, device=device,
                              dtype=dtype, seeds=micro_batch_seeds(config.data.seed, step, accum))
            step += 1
            meter.add(loss, micro_batch * accum)
            if parts.ema is not None:
                with full_named_tensors(engine) as tensors:
                    parts.ema.update(tensors)
            logging = step % run.log_every == 0 or step == total_steps
            # Epoch ends and the last step (run.max_steps may stop mid-epoch) always get both.
            boundary = step % epoch_steps == 0 or step == total_steps
            if logging or boundary:  # a collective: every rank at the same steps
                skipped = skipped_counts(train_loader, device)
                parts.ledger.note_skipped(epoch, int(sum(skipped.values())))
            if logging:
                window = meter.flush(step, total_steps, device)
                # Loss and LR first: the MLflow run lists its metrics in the order first logged.
                metrics = {"train/loss": window.pop("train/loss"), "train/lr": lr,
                           "epoch": epoch, **window}
                if config.scaling.min_workers:  # elastic: the group's size over the run
                    metrics["scaling/workers"] = workers
                check_finite(metrics["train/loss"], step, config.engine.precision)
                # Skip counters only when a sample was skipped; the run's total at the end.
                metrics.update({key: value for key, value in skipped.items() if value})
                if step == total_steps:
                    metrics["skipped_samples"] = parts.ledger.skipped_total()
                dist.say(format_progress(step, total_steps, epoch, lr, metrics))
                tracker.log(metrics, step)
            if boundary or (run.eval_every and step % run.eval_every == 0):
                result = run_eval()
                tracker.log(result, step)
                metrics.update(result)
            stopping = (stop_requested is not None and step % run.stop_check_every == 0
                        and step < total_steps and stop_agreed(stop_requested, device))
            if (boundary or stopping
                    or (run.checkpoint_every and step % run.checkpoint_every == 0)):
                check_finite(loss.item(), step, config.engine.precision)  # never commit NaN weights
                parts.checkpointer.commit(step=step, epoch=step // epoch_steps, metrics=metrics)
            if stopping:
                dist.say(f"stop requested: checkpoint of step {step} committed, stopping")
                raise StopRequested(step)
        del batches
    return {**metrics, "step": step}
