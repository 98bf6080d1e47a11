"""The training worker's entry point: build the parts, restore, ``fit``, log the weights, close.

``t2t_dist.launch.driver`` hands ``train_worker`` to the TorchTrainer with the resolved
config as a plain dict.
"""

from __future__ import annotations

import json
from typing import Any

import ray.train

from t2t_dist import dist
from t2t_dist.config import Config, from_dict
from t2t_dist.engine import consolidated_fp32_state_dict
from t2t_dist.launch.build import Parts, build_model, build_parts
from t2t_dist.loop import fit


def log_final_models(config: Config, parts: Parts) -> None:
    """Consolidated fp32 weights (and the EMA's) as MLflow models; a collective on every rank."""
    weights = consolidated_fp32_state_dict(parts.engine)
    if not dist.is_main():
        return
    export = build_model(config, pretrained=False)
    export.load_state_dict(weights)
    parts.tracker.log_model(export, name="model")
    if parts.ema is not None:
        export.load_state_dict(parts.ema.shadow)
        parts.tracker.log_model(export, name="model_ema")


STOP_RECORD = "stopped.json"  # beside the checkpoints: why the workers ended the run early
STOP_TAG = "t2t_dist.stopped"


def record_stop(config: Config, message: str) -> None:
    """Rank 0 writes ``message`` where the driver reads it after ``fit`` (``read_stop``)."""
    if dist.is_main():
        from t2t_dist.launch.preflight import _run_store

        _run_store(config).put(STOP_RECORD, json.dumps({"message": message}).encode())


def read_stop(config: Config, *, clear: bool = False) -> str:
    """The message the workers recorded when they stopped the run ("" when they did not)."""
    from t2t_dist.launch.preflight import _run_store

    store = _run_store(config)
    try:
        message = json.loads(store.get(STOP_RECORD))["message"]
    except (FileNotFoundError, ValueError, KeyError):
        message = ""
    if clear:
        store.delete(STOP_RECORD)
    return message


def train_worker(payload: dict[str, Any]) -> None:
    """Per-worker entry: ``payload`` holds ``config`` (a plain dict) and MLflow ``tags``.

    A non-finite loss is deterministic: a restart from the last checkpoint would meet it
    again, ``run.max_failures`` times. Every rank sees it at the same step (the loss is
    summed over ranks), so every rank ends cleanly here instead of raising (which Ray Train
    would retry), the MLflow run is closed FAILED with the reason as a tag, and the driver
    finds the reason in ``STOP_RECORD``. The checkpoints before it stay the latest.
    """
    config = from_dict(Config, payload["config"])
    parts = build_parts(config, tags=payload["tags"])
    resume = parts.checkpointer.restore(ray.train.get_checkpoint())
    status = "FAILED"
    try:
        fit(config, **parts.fit_kwargs(), resume=resume)
        if config.run.log_model:
            log_final_models(config, parts)
        status = "FINISHED"
    except FloatingPointError as error:
        parts.tracker.set_tags({STOP_TAG: str(error)})
        record_stop(config, str(error))
    finally:
        parts.tracker.close(status)
