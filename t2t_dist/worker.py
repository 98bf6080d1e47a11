"""What every Ray Train worker runs: build the pieces, resume, ``fit``, export, close.

Launch-side (it imports ray); ``t2t_dist.launch`` hands ``train_worker`` to the TorchTrainer
with the resolved config as a plain dict.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from t2t_dist import dist
from t2t_dist.checkpoint import Checkpointer
from t2t_dist.config import Config, from_dict
from t2t_dist.data import BatchAugment, build_train_loader, build_val_loader
from t2t_dist.engine import batch_split, build_engine, consolidated_fp32_state_dict
from t2t_dist.loop import fit
from t2t_dist.models import create_model, load_pretrained
from t2t_dist.optim import LRSchedule, WeightEma
from t2t_dist.tracking import make_tracker


def build_model(config: Config, num_classes: int) -> torch.nn.Module:
    """The variant ``model.name`` with this run's image size, classes and drop path."""
    model_cfg = config.model
    model = create_model(model_cfg.name, img_size=model_cfg.img_size, num_classes=num_classes,
                         drop_path_rate=model_cfg.drop_path_rate, attention=model_cfg.attention)
    if model_cfg.pretrained:
        load_pretrained(model, model_cfg.pretrained)
    return model


def publish(metrics: dict[str, float], directory: Path, step: int) -> None:
    """Hand this rank's checkpoint folder to Ray Train, which merges all ranks' folders."""
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                     checkpoint_dir_name=f"checkpoint_step_{step:08d}")


def train_worker(payload: dict[str, Any]) -> None:
    """Per-worker entry: ``payload`` holds ``config`` (a plain dict) and MLflow ``tags``."""
    config = from_dict(Config, payload["config"])
    rank, world = dist.rank(), dist.world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.run.seed)  # same initial weights on every rank
    micro_batch, _ = batch_split(config.data.global_batch, world, config.engine.micro_batch)

    train_loader = build_train_loader(config.data, img_size=config.model.img_size, rank=rank,
                                      world_size=world, micro_batch=micro_batch)
    val_loader = build_val_loader(config.data, img_size=config.model.img_size, rank=rank,
                                  world_size=world)
    num_classes = config.model.num_classes  # preflight checked it against the shards
    model = build_model(config, num_classes)
    ema = ema_model = None
    if config.optim.ema_decay > 0:
        ema = WeightEma(model.state_dict(), decay=config.optim.ema_decay, device=device)
        ema_model = copy.deepcopy(model).to(device).eval()  # fp32, outside DeepSpeed
    engine = build_engine(model, config, world_size=world, device=device)
    augment = BatchAugment(config.data, num_classes).to(device)
    steps_per_epoch = len(train_loader) // engine.gradient_accumulation_steps()
    schedule = LRSchedule.from_config(config.optim, global_batch=config.data.global_batch,
                                      steps_per_epoch=steps_per_epoch)
    checkpointer = Checkpointer(engine, loader=train_loader, ema=ema)

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = checkpointer.load(directory)

    tracker = make_tracker(config, tags=payload["tags"])
    status = "FAILED"
    try:
        fit(config, engine=engine, train_loader=train_loader, val_loader=val_loader,
            augment=augment, schedule=schedule, checkpointer=checkpointer, tracker=tracker,
            publish=publish, device=device, ema=ema, ema_model=ema_model, resume=resume)
        if config.run.log_model:
            weights = consolidated_fp32_state_dict(engine)  # a collective: every rank joins
            if dist.is_main():
                export = build_model(config, num_classes)
                export.load_state_dict(weights)
                tracker.log_model(export, name="model")
                if ema is not None:
                    export.load_state_dict(ema.shadow)
                    tracker.log_model(export, name="model_ema")
        status = "FINISHED"
    finally:
        tracker.close(status)
