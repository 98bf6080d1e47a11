"""The evaluation job on Ray workers (``jobs/evaluate.py``), and the driver-side weights
resolution it shares with fine-tuning. The metrics themselves are ``loop.evaluate``'s.

    config = evaluation_config(checkpoint, model="t2t_vit_14", data="s3://.../val-{0000..0063}.tar")
    config, weights = materialize_weights(config, checkpoint, new_head=False)   # driver
    preflight_evaluation(config)
    metrics = launch_evaluation(config, weights)                                  # Ray workers

The driver resolves the checkpoint (a released file, one of our runs' ZeRO checkpoints, an
MLflow model; ``t2t_dist.export``) once, checks it fits the model (variant, class count) and
writes the fp32 weights beside the run as one file that ``model.pretrained`` points at: the
workers then build the model exactly as training does (``build.build_model``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import torch

from t2t_dist import dist
from t2t_dist.checkpoint import CHECKPOINT_PREFIX
from t2t_dist.config import SAVED_CONFIG, Config, ConfigError, from_dict, load_config, run_dir
from t2t_dist.export import (Weights, find_checkpoint, is_mlflow_uri, load_weights,
                             resolve_weights, source_model_id)
from t2t_dist.launch.build import build_eval_parts, build_model
from t2t_dist.launch.console import open_console
from t2t_dist.launch.driver import build_trainer, connect, open_tracking, run_tags
from t2t_dist.launch.preflight import check_model_name, check_shards_resolve
from t2t_dist.loop import evaluate
from t2t_dist.storage import open_store
from t2t_dist.tracking import DESCRIPTION_TAG, SOURCE_MODEL_TAG, check_credentials

WEIGHTS_FILE = "source_weights.pt"  # beside the run's checkpoints: what model.pretrained names


def saved_run_config(checkpoint: str, storage_path: str) -> Path | None:
    """The resolved config a training run saved beside ``checkpoint``, if it is one of ours."""
    if is_mlflow_uri(checkpoint):
        return None
    try:
        directory = find_checkpoint(checkpoint, storage_path)
    except FileNotFoundError:
        return None
    path = directory.parent / SAVED_CONFIG if directory else None
    return path if path and path.is_file() else None


def evaluation_config(checkpoint: str, *, config_path: str | None = None, model: str | None = None,
                      data: str | None = None, overrides: list[str] = ()) -> Config:
    """The evaluation's config: the training run's own saved config when ``checkpoint`` is one
    of our runs (same model, eval batch, crop and precision), else ``config_path`` or the
    defaults; then ``--model``, ``--data`` (validation shards) and ``--set`` on top.

    The MLflow run is ``eval-<source>-<time>`` unless ``--set run.name=...`` names it: the
    source is the run (and ``step<N>`` for one of its checkpoints) or the file's name.
    """
    first = load_config(config_path, overrides=overrides)
    saved = None if config_path else saved_run_config(checkpoint, first.run.storage_path)
    if saved is not None and model:
        trained = load_config(saved).model.name
        if trained != model:
            raise ConfigError(f"checkpoint {checkpoint!r} is a {trained} checkpoint (its run "
                              f"config), not model.name={model!r}: expected --model {trained}")
    extra = [f"data.val_urls={data}"] if data else []
    config = load_config(saved or config_path, model=model, overrides=[*extra, *overrides])
    if not any(item.strip().startswith("run.name=") for item in overrides):
        config = dataclasses.replace(config, run=dataclasses.replace(
            config.run, name=f"eval-{source_label(checkpoint, saved)}-"
                             f"{time.strftime('%Y%m%d-%H%M%S')}"))
    return config


def source_label(checkpoint: str, saved: Path | None) -> str:
    """What an evaluation run's name says it evaluated: ``<run>`` for a run,
    ``<run>-step230`` for one of its checkpoints, else the file's (or model URI's) name."""
    label = Path(checkpoint.rstrip("/")).name.replace("@", "-").replace(":", "") or "model"
    if saved is None:
        return label
    run = saved.parent.name
    if label.startswith(CHECKPOINT_PREFIX):
        return f"{run}-step{int(label[len(CHECKPOINT_PREFIX):])}"
    return run


def materialize_weights(config: Config, source: str, *, new_head: bool,
                        ema: bool = False) -> tuple[Config, Weights]:
    """Resolve ``source``, check it fits ``config.model`` and point ``model.pretrained`` at it.

    A plain weights file is used where it is; our checkpoints, run names and MLflow models
    are consolidated here once and written to ``<run_dir>/source_weights.pt`` through the
    run's store (local, shared or s3:// storage: the workers read it from there).
    """
    weights = resolve_weights(source, storage_path=config.run.storage_path,
                              tracking_uri=config.run.tracking_uri, ema=ema)
    check_model_name(config.model.name)
    load_weights(build_model(config, pretrained=False), weights, new_head=new_head)
    if weights.kind == "file" and not source.endswith(".safetensors"):
        path = str(Path(source).resolve())
    else:
        buffer = io.BytesIO()
        torch.save(dict(weights.checkpoint), buffer)
        folder = open_store(run_dir(config))
        folder.put(WEIGHTS_FILE, buffer.getbuffer())
        path = folder.url(WEIGHTS_FILE)
    model = dataclasses.replace(config.model, pretrained=path)
    return dataclasses.replace(config, model=model), weights


def preflight_evaluation(config: Config) -> None:
    """Evaluation's preflight: variant, validation shards, their class count (one line each)."""
    check_model_name(config.model.name)
    check_credentials(config.run.tracking_uri)
    val = check_shards_resolve("val_urls", config.data.val_urls)
    if len(val.classes) != config.model.num_classes:
        raise ConfigError(f"model.num_classes={config.model.num_classes} is invalid: the "
                          f"validation shards have {len(val.classes)} classes; expected "
                          f"--set model.num_classes={len(val.classes)} with a checkpoint of "
                          f"{len(val.classes)} classes")


def report_result(result: dict[str, float]) -> None:
    """Hand the numbers to the driver. Ray Train V2 keeps a run's metrics only with a
    checkpoint, so rank 0 reports a small folder (``evaluation.json``) as one; every rank
    reports (a barrier)."""
    with tempfile.TemporaryDirectory(prefix="t2t-eval-") as directory:
        checkpoint = None
        if dist.is_main():
            (Path(directory) / "evaluation.json").write_text(json.dumps(result, indent=1))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(result, checkpoint=checkpoint, checkpoint_dir_name="evaluation")


def evaluate_worker(payload: dict[str, Any]) -> None:
    """Per-worker entry: evaluate ``model.pretrained`` over this rank's share of the shards."""
    config = from_dict(Config, payload["config"])
    tags = payload["tags"]
    parts = build_eval_parts(config, tags=tags)
    status = "FAILED"
    try:
        metrics = evaluate(parts.model, parts.val_loader, data=config.data, device=parts.device,
                           dtype=parts.dtype, autocast=parts.autocast)
        result = {f"eval/{key}": value for key, value in metrics.items()}
        parts.tracker.log(result, step=int(tags.get("source_step", 0) or 0))
        report_result(result)
        status = "FINISHED"
    finally:
        parts.tracker.close(status)


def weights_tags(config: Config, weights: Weights, *, ema: bool = False) -> dict[str, str]:
    """MLflow tags naming the weights a run starts from (fine-tuning) or evaluates: the source
    as resolved, its kind and step, and the MLflow model it is, for lineage, when known."""
    tags = {"source": weights.source, "source_kind": weights.kind,
            "source_step": "" if weights.step is None else str(weights.step)}
    model_id = source_model_id(weights, config.run.tracking_uri, ema=ema)
    return {**tags, SOURCE_MODEL_TAG: model_id} if model_id else tags


def launch_evaluation(config: Config, weights: Weights, *, ema: bool = False) -> dict[str, float]:
    """Evaluate on ``scaling.num_workers`` Ray workers; returns ``eval/{loss,top1,top5}``."""
    open_tracking(config)
    started = connect(config)
    try:
        tags = {**run_tags(config), **weights_tags(config, weights, ema=ema), "job": "evaluate",
                DESCRIPTION_TAG: f"Evaluation of `{weights.source}` ({config.model.name}"
                                 f"{', EMA' if ema else ''}) on `{config.data.val_urls}`, "
                                 f"{config.scaling.num_workers} workers, "
                                 f"{config.engine.precision}."}
        with open_console():
            result = build_trainer(config, tags, worker=evaluate_worker).fit()
    finally:
        if started:
            ray.shutdown()
    return dict(result.metrics or {})


def format_evaluation(config: Config, weights: Weights, metrics: dict[str, float]) -> str:
    step = f" (step {weights.step})" if weights.step is not None else ""
    return (f"{weights.source}{step}: {config.model.name} on {config.data.val_urls} with "
            f"{config.scaling.num_workers} workers, {config.engine.precision}: "
            f"top-1 {metrics['eval/top1']:.4f} | top-5 {metrics['eval/top5']:.4f} | "
            f"loss {metrics['eval/loss']:.6f}\nMLflow: run {config.run.name!r} in experiment "
            f"{config.run.experiment!r} at {config.run.tracking_uri}")
