"""``loop.fit`` in one process (gloo, world size 1, a stub publish): the cadence of logs, evals
and checkpoints, a ``run.max_steps`` stop mid-epoch, and the NaN stop, in seconds."""

import math
import re

import pytest
import torch
from torch import nn

from t2t_dist.checkpoint import Checkpointer, SampleLedger, checkpoint_step
from t2t_dist.config import load_config, worker_batch_split
from t2t_dist.data import BatchAugment, build_train_loader, build_val_loader
from t2t_dist.engine import build_engine
from t2t_dist.loop import (StopRequested, TrainParts, fit, micro_batch_seeds, planned_steps,
                          steps_per_epoch)
from t2t_dist.models import create_model
from t2t_dist.optim import LRSchedule

DEVICE = torch.device("cpu")


class RecordingTracker:
    def __init__(self):
        self.logged: list[tuple[int, dict]] = []
        self.tags: dict[str, str] = {}

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def set_tags(self, tags):
        self.tags.update(tags)

    def log_model(self, model, name="model", **kwargs):
        raise AssertionError("fit never logs models")

    def close(self, status="FINISHED"):
        pass


class NanAfter(nn.Module):
    """The real augmentation, then NaN images from the ``after``-th call on."""

    def __init__(self, augment: nn.Module, after: int):
        super().__init__()
        self.augment, self.after, self.calls = augment, after, 0

    def forward(self, images, labels):
        images, targets = self.augment(images, labels)
        self.calls += 1
        return (images * math.nan if self.calls > self.after else images), targets


def first_shards(pattern: str, count: int) -> str:
    """``.../digits-train-{0000..0007}.tar`` -> the first ``count`` shards (200 samples each)."""
    return re.sub(r"\{0+\.\.(\d+)\}", lambda m: "{%s..%0*d}" % ("0" * len(m[1]), len(m[1]),
                                                              count - 1), pattern)


def build(digits, *settings):
    config = load_config(overrides=[
        f"data.train_urls={first_shards(digits['train'], 2)}",
        f"data.val_urls={first_shards(digits['val'], 1)}",
        "model.name=t2t_vit_tiny", "model.compile=false", "model.img_size=32",
        "model.num_classes=10", "data.global_batch=64", "data.loader_workers=0",
        "engine.precision=fp32", "engine.zero_stage=2", "optim.epochs=2",
        "optim.warmup_epochs=0.5", "optim.cooldown_epochs=0", "optim.ema_decay=0",
        "data.mixup_alpha=0", "data.cutmix_alpha=0", *settings])
    torch.manual_seed(0)
    micro_batch, _ = worker_batch_split(config, 1)
    train_loader = build_train_loader(config.data, img_size=32, micro_batch=micro_batch)
    val_loader = build_val_loader(config.data, img_size=32)
    model = create_model("t2t_vit_tiny", img_size=32, num_classes=10)
    engine = build_engine(model, config, world_size=1, device=DEVICE)
    schedule = LRSchedule.from_config(config.optim, global_batch=64,
                                      steps_per_epoch=steps_per_epoch(train_loader, engine))
    published: list[tuple[int, dict, list[str]]] = []

    def publish(metrics, directory, name):  # what Ray Train would receive
        step = checkpoint_step(name)
        files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*.pt"))
        published.append((step, dict(metrics), files))

    ledger = SampleLedger()
    checkpointer = Checkpointer(engine, {"loader": train_loader, "samples_seen": ledger},
                                publish=publish)
    parts = TrainParts(engine=engine, train_loader=train_loader, val_loader=val_loader,
                       augment=BatchAugment(config.data, 10), schedule=schedule, ledger=ledger,
                       checkpointer=checkpointer, tracker=RecordingTracker(), device=DEVICE)
    return config, parts, published


@pytest.mark.slow
def test_cadence_and_max_steps_stop_mid_epoch(process_group, digits_shards):
    config, parts, published = build(digits_shards, "run.log_every=3", "run.eval_every=4",
                                      "run.checkpoint_every=5", "run.max_steps=8")
    epoch_steps = steps_per_epoch(parts.train_loader, parts.engine)
    assert epoch_steps == 400 // 64 == 6  # two shards of 200; the last partial batch dropped
    tracker = parts.tracker
    final = fit(config, parts)

    train_steps = [step for step, m in tracker.logged if "train/loss" in m]
    eval_steps = [step for step, m in tracker.logged if "val/top1" in m]
    assert train_steps == [3, 6, 8]  # every log_every, and the last step
    assert eval_steps == [4, 6, 8]  # every eval_every, the epoch end, the last step
    assert [step for step, _, _ in published] == [5, 6, 8]  # every checkpoint_every, epoch end, last
    assert [m["epoch"] for _, m, _ in published] == [0, 1, 1]  # the epoch a resume starts in
    assert all("client/rank_00000.pt" in files for _, _, files in published)
    # A checkpoint carries the metrics of its step: the epoch-end eval at 6, the last at 8.
    by_step = {step: m for step, m, _ in published}
    assert by_step[8]["val/top1"] == final["val/top1"] == tracker.logged[-1][1]["val/top1"]
    assert by_step[6]["val/top1"] == dict(tracker.logged)[6]["val/top1"]
    assert final["train/lr"] == pytest.approx(parts.schedule(7))
    assert parts.train_loader.state_dict()["epoch"] == 1  # stopped inside the second epoch
    assert final["step"] == 8 == planned_steps(config, train_samples=400)  # what the driver says
    # The MLflow run's first metric keys: loss and LR; skip counters only when a sample was
    # skipped (none here), their run total once, at the last step.
    first = dict(tracker.logged)[3]
    assert list(first)[:2] == ["train/loss", "train/lr"]
    assert not [key for _, m in tracker.logged for key in m if key.startswith("data/skipped")]
    assert [step for step, m in tracker.logged if "skipped_samples" in m] == [8]
    assert final["skipped_samples"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("log_every, checkpoint_every, kept", [
    (1, 2, [2, 4]),  # seen at the log line
    (10, 1, [1, 2, 3, 4, 5]),  # seen before the checkpoint, though no log line is due
])
def test_nan_loss_stops_with_the_step_and_keeps_earlier_checkpoints(
        process_group, digits_shards, log_every, checkpoint_every, kept):
    config, parts, published = build(digits_shards, f"run.log_every={log_every}",
                                      f"run.checkpoint_every={checkpoint_every}")
    parts.augment = NanAfter(parts.augment, after=5)
    with pytest.raises(FloatingPointError, match=r"training loss is nan at step 6: lower optim.lr "
                                                 r"or raise optim.warmup_epochs$"):
        fit(config, parts)
    assert [step for step, _, _ in published] == kept  # nothing written at or after the NaN


@pytest.mark.slow
@pytest.mark.parametrize("stop_check_every, yes_on_call, published_steps", [
    (3, 1, [3]),  # asked at 3 (no checkpoint due): one is committed there
    (2, 2, [4]),  # asked at 2 (no), 4 (yes): 4 is a checkpoint_every step, committed once
])
def test_stop_request_commits_a_checkpoint_then_stops(process_group, digits_shards,
                                                      stop_check_every, yes_on_call,
                                                      published_steps):
    config, parts, published = build(digits_shards, "run.log_every=5", "run.checkpoint_every=4",
                                      f"run.stop_check_every={stop_check_every}")
    calls = []

    def requested():
        calls.append(len(calls) + 1)
        return len(calls) >= yes_on_call

    with pytest.raises(StopRequested) as stopped:
        fit(config, parts, stop_requested=requested)
    step = stop_check_every * yes_on_call
    assert stopped.value.step == step and len(calls) == yes_on_call
    assert [s for s, _, _ in published] == published_steps
    assert published[-1][1]["step"] == step
    assert "client/rank_00000.pt" in published[-1][2]
    assert parts.train_loader.state_dict()["position"] == step * 64  # resumes right after


@pytest.mark.slow
def test_elastic_group_of_one_accumulates_and_says_why_it_resized(process_group, digits_shards):
    """An elastic group (2 workers, min 1) resumed on 1 worker from a 2-worker checkpoint: the
    same global batch, steps per epoch and LR as the full group, by gradient accumulation;
    the size change is said in one line and tagged in MLflow, the size logged with progress."""
    config, parts, _ = build(digits_shards, "scaling.num_workers=2", "scaling.min_workers=1",
                             "run.log_every=1", "run.max_steps=2")
    # The full group: 2 workers x 32 = 64 a step, 400 // 64 steps an epoch.
    full_group = LRSchedule.from_config(config.optim, global_batch=64, steps_per_epoch=6)
    assert parts.engine.gradient_accumulation_steps() == 2
    assert parts.engine.train_micro_batch_size_per_gpu() == 32  # the full group's share
    assert steps_per_epoch(parts.train_loader, parts.engine) == 400 // 64
    assert [parts.schedule(step) for step in range(12)] == [full_group(step) for step in range(12)]
    tracker = parts.tracker
    fit(config, parts, resume={"step": 0, "resumed_world_size": 2})
    assert tracker.tags == {"t2t_dist.resize.step_00000000": (
        "workers 2 -> 1 at step 0: the group lost workers (a worker or its node failed) and Ray "
        "Train restarted it with what the cluster holds (scaling.min_workers=1)")}
    assert [m["scaling/workers"] for _, m in tracker.logged if "train/loss" in m] == [1, 1]
    assert parts.train_loader.state_dict()["position"] == 2 * 64


def test_micro_batch_seeds_follow_the_micro_batch_not_the_worker(monkeypatch):
    """A step's micro batch j (rank j % world) gets the same seed on any number of workers:
    2 workers x 1 micro batch, 1 worker x 2, 4 workers x 1 and 2 x 2 draw alike."""
    from t2t_dist import dist

    def seeds(world: int, accum: int) -> list[int]:
        monkeypatch.setattr(dist, "world_size", lambda: world)
        by_index = {}
        for rank in range(world):
            monkeypatch.setattr(dist, "rank", lambda: rank)
            for index, seed in enumerate(micro_batch_seeds(7, 12, accum)):
                by_index[index * world + rank] = seed
        return [by_index[j] for j in sorted(by_index)]

    assert seeds(2, 1) == seeds(1, 2)
    assert seeds(4, 1) == seeds(2, 2) == seeds(1, 4)
    assert len(set(seeds(1, 4))) == 4
    assert micro_batch_seeds(7, 12, 1) != micro_batch_seeds(7, 13, 1) != micro_batch_seeds(8, 12, 1)
