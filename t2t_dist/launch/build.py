"""Config -> the parts a worker runs: model, engine, loaders, augmentation, schedule, EMA,
checkpointer, tracker. One builder, shared by the training, evaluation and sweep workers.

    parts = build_parts(config, tags=payload["tags"])      # inside a Ray Train worker
    resume = parts.checkpointer.restore(ray.train.get_checkpoint(), stored_checkpoints())
    fit(config, parts, resume=resume)
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn

from t2t_dist import dist
from t2t_dist.checkpoint import Checkpointer, Replicated, SampleLedger, run_checkpoints
from t2t_dist.config import Config, worker_batch_split
from t2t_dist.data import BatchAugment, build_train_loader, build_val_loader
from t2t_dist.engine import build_engine, compute_dtypes
from t2t_dist.loop import TrainParts, steps_per_epoch
from t2t_dist.models import T2TViT, load_pretrained, read_checkpoint, resolve
from t2t_dist.optim import LRSchedule, WeightEma
from t2t_dist.storage import is_s3, split_url
from t2t_dist.tracking import MlflowTracker, NullTracker, make_tracker


def read_weights(url: str) -> str | dict:
    """``model.pretrained`` as ``load_pretrained`` takes it: a local path as it is; an s3://
    object (e.g. the consolidated weights a driver wrote to a run's store) read into memory."""
    if not is_s3(url):
        return url
    store, key = split_url(url)
    return read_checkpoint(io.BytesIO(store.get(key)))


def build_model(config: Config, *, pretrained: bool = True) -> nn.Module:
    """The variant ``model.name`` with this run's image size, classes and drop path, and the
    ``model.pretrained`` weights (a file or an s3:// object) when ``pretrained``."""
    model = T2TViT(resolve(config.model))
    if pretrained and config.model.pretrained:
        load_pretrained(model, read_weights(config.model.pretrained))
    return model


def publish(metrics: dict[str, float], directory: Path, name: str) -> None:
    """Hand this rank's checkpoint folder to Ray Train, which merges all ranks' folders into
    the run's folder ``name`` (``checkpoint.checkpoint_folder_name``).

    The worker group's placement group id rides along: a sweep whose trial Tune stops early
    frees it by id (Ray would keep it until the driver exits, upstream ray#54305).
    """
    group = ray.util.get_current_placement_group()
    if group is not None:
        metrics = {**metrics, "placement_group_id": group.id.hex()}
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                     checkpoint_dir_name=name)


def stored_checkpoints() -> list[ray.train.Checkpoint]:
    """Every checkpoint folder of this run in Ray Train's storage, newest first, whether or not
    the controller registered it (``Checkpointer.restore`` takes the newest complete one)."""
    # get_storage is Ray Train's DeveloperAPI: the filesystem and folder it writes checkpoints to.
    storage = ray.train.get_context().get_storage()
    filesystem = storage.storage_filesystem
    return run_checkpoints(storage.experiment_fs_path, filesystem,
                           lambda path: ray.train.Checkpoint(path, filesystem=filesystem))


def build_parts(config: Config, *, tags: dict[str, str]) -> TrainParts:
    """Build every part on this worker (a collective: DeepSpeed joins the process group)."""
    rank, world = dist.rank(), dist.world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.run.seed)  # same initial weights on every rank
    micro_batch, _ = worker_batch_split(config, world)  # elastic: accumulation absorbs a resize
    train_loader = build_train_loader(config.data, img_size=config.model.img_size, rank=rank,
                                      world_size=world, micro_batch=micro_batch)
    val_loader = build_val_loader(config.data, img_size=config.model.img_size, rank=rank,
                                  world_size=world)
    model = build_model(config)
    ema = ema_model = None
    if config.optim.ema_decay > 0:
        ema = WeightEma(model.state_dict(), decay=config.optim.ema_decay, device=device)
        ema_model = copy.deepcopy(model).to(device).eval()  # fp32, outside DeepSpeed
    engine = build_engine(model, config, world_size=world, device=device)
    augment = BatchAugment(config.data, config.model.num_classes).to(device)
    schedule = LRSchedule.from_config(config.optim, global_batch=config.data.global_batch,
                                      steps_per_epoch=steps_per_epoch(train_loader, engine))
    ledger = SampleLedger()
    # Everything besides the engine and the RNG that must survive a restart: one entry each.
    states = {"loader": train_loader, "samples_seen": ledger,
              "ema": Replicated(ema) if ema is not None else None}
    checkpointer = Checkpointer(engine, states, publish=publish)
    return TrainParts(device=device, engine=engine, train_loader=train_loader,
                      val_loader=val_loader, augment=augment, schedule=schedule, ledger=ledger,
                      checkpointer=checkpointer, tracker=make_tracker(config, tags=tags),
                      ema=ema, ema_model=ema_model)


@dataclass
class EvalParts:
    """What an evaluation worker built: the model in its evaluation dtype, this rank's share
    of the validation shards, the tracker."""

    device: torch.device
    model: nn.Module
    dtype: torch.dtype
    autocast: torch.dtype | None
    val_loader: Any
    tracker: MlflowTracker | NullTracker


def build_eval_parts(config: Config, *, tags: dict[str, str]) -> EvalParts:
    """Model (``model.pretrained`` loaded, in the engine's weight dtype) and validation loader.

    No DeepSpeed: plain weights on every worker; ``loop.evaluate`` sums over ranks. The model
    computes as the engine computed during training (bf16 at ZeRO-0: autocast over the fp32
    weights; with ZeRO, bf16 weights, the fp32 masters rounded as DeepSpeed's own copy is), so a
    checkpoint scores exactly what the in-training evaluation of that step scored.
    """
    device = ray.train.torch.get_device()
    dtype, autocast = compute_dtypes(config.engine)
    val_loader = build_val_loader(config.data, img_size=config.model.img_size, rank=dist.rank(),
                                  world_size=dist.world_size())
    model = build_model(config).to(device=device, dtype=dtype).eval()
    if config.model.compile:
        model = torch.compile(model)
    return EvalParts(device=device, model=model, dtype=dtype, autocast=autocast,
                     val_loader=val_loader, tracker=make_tracker(config, tags=tags, training=False))
