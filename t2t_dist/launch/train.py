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
from t2t_dist.launch.preflight import run_store
from t2t_dist.loop import StopRequested, fit


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
STOP_REQUEST = "stop-request.json"  # the driver asks the workers to checkpoint and stop
STOP_TAG = "t2t_dist.stopped"


def record_stop(config: Config, message: str, *, kind: str) -> None:
    """Rank 0 writes why the run ended early (``kind``: "failed" or "requested"), where the
    driver reads it after ``fit`` (``read_stop``)."""
    if dist.is_main():
        run_store(config).put(STOP_RECORD, json.dumps({"message": message, "kind": kind}).encode())


def read_stop(config: Config, *, clear: bool = False) -> dict[str, str]:
    """What the workers recorded when they ended the run early ({} when they did not)."""
    store = run_store(config)
    try:
        record = json.loads(store.get(STOP_RECORD))
        record = {"message": str(record["message"]), "kind": str(record.get("kind", "failed"))}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        record = {}
    if clear:
        store.delete(STOP_RECORD)
    return record


def request_stop(config: Config, reason: str) -> None:
    """Ask the run's workers to commit a checkpoint and stop (rank 0 looks every
    ``run.stop_check_every`` steps)."""
    run_store(config).put(STOP_REQUEST, json.dumps({"reason": reason}).encode())


def clear_stop_request(config: Config) -> None:
    run_store(config).delete(STOP_REQUEST)


def has_stop_request(store) -> bool:
    """Whether the run's store (``run_store``) holds a stop request."""
    try:
        store.get(STOP_REQUEST)
    except FileNotFoundError:
        return False
    return True


def train_worker(payload: dict[str, Any]) -> None:
    """Per-worker entry: ``payload`` holds ``config`` (a plain dict) and MLflow ``tags``.

    A stop request (the driver got SIGTERM or SIGUSR1, see ``driver.stop_on_signals``) ends
    ``fit`` after a checkpoint; the MLflow run is closed KILLED until the run resumes.

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
        store = run_store(config)  # one store (one S3 client) for every stop-request check
        fit(config, **parts.fit_kwargs(), resume=resume,
            stop_requested=lambda: has_stop_request(store))
        if config.run.log_model:
            log_final_models(config, parts)
        status = "FINISHED"
    except StopRequested as stop:  # the checkpoint is committed; the same command resumes
        status = "KILLED"
        record_stop(config, f"step {stop.step}", kind="requested")
    except FloatingPointError as error:
        parts.tracker.set_tags({STOP_TAG: str(error)})
        record_stop(config, str(error), kind="failed")
    finally:
        parts.tracker.close(status)
