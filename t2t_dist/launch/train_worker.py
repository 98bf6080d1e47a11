"""The training worker's entry point (pretraining and fine-tuning): build the parts, restore,
``loop.fit``, log the weights, close.

``t2t_dist.launch.driver`` hands ``train_worker`` to the TorchTrainer with the resolved
config as a plain dict.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.train

from t2t_dist import dist
from t2t_dist.checkpoint import CHECKPOINT_PREFIX
from t2t_dist.config import Config, from_dict, run_dir
from t2t_dist.data import normalize
from t2t_dist.engine import consolidated_fp32_state_dict
from t2t_dist.launch.build import build_model, build_parts, stored_checkpoints
from t2t_dist.launch.stop import STOP_TAG, has_stop_request, record_finish, record_stop
from t2t_dist.loop import StopRequested, TrainParts, fit
from t2t_dist.storage import open_store

EXAMPLE_IMAGES = 2  # the logged models' input example: validation images, normalized


def input_example(config: Config, parts: TrainParts) -> np.ndarray:
    """The first validation images of this rank, as the model takes them: (B, 3, H, W) fp32."""
    images, _ = next(iter(parts.val_loader))
    return normalize(images[:EXAMPLE_IMAGES], config.data).float().numpy()


def log_final_models(config: Config, parts: TrainParts, step: int) -> None:
    """Consolidated fp32 weights (and the EMA's) as MLflow models of ``step`` (MLflow links
    them to that step's validation metrics); a collective on every rank."""
    weights = consolidated_fp32_state_dict(parts.engine)
    if not dist.is_main():
        return
    example = input_example(config, parts)
    export = build_model(config, pretrained=False)
    export.load_state_dict(weights)
    parts.tracker.log_model(export, name="model", step=step, example=example)
    if parts.ema is not None:
        export.load_state_dict(parts.ema.shadow)
        parts.tracker.log_model(export, name="model_ema", step=step, example=example)


def train_worker(payload: dict[str, Any]) -> None:
    """Per-worker entry: ``payload`` holds ``config`` (a plain dict) and MLflow ``tags``.

    A stop request (the driver got Ctrl-C, SIGTERM or SIGUSR1, see ``stop.stop_on_signals``)
    ends ``fit`` after a checkpoint; the MLflow run is closed KILLED until the run resumes.
    A run that trained to its end leaves ``finished.json`` (``stop.record_finish``): the same
    command again stops at the driver, before Ray.

    A non-finite loss is deterministic: a restart from the last checkpoint would meet it
    again, ``run.max_failures`` times. Every rank sees it at the same step (the loss is
    summed over ranks), so every rank ends cleanly here instead of raising (which Ray Train
    would retry), the MLflow run is closed FAILED with the reason as a tag, and the driver
    finds the reason in the stop record. The checkpoints before it stay the latest.
    """
    config = from_dict(Config, payload["config"])
    parts = build_parts(config, tags=payload["tags"])
    resume = parts.checkpointer.restore(ray.train.get_checkpoint(), stored_checkpoints())
    status = "FAILED"
    try:
        folder = open_store(run_dir(config))  # the stop files; one store (one S3 client) for all
        final = fit(config, parts, resume=resume,
                    stop_requested=lambda: has_stop_request(folder))
        if config.run.log_model:
            log_final_models(config, parts, final["step"])
        record_finish(folder, step=final["step"], metrics=final,
                      checkpoint=f"{CHECKPOINT_PREFIX}{final['step']:08d}",
                      mlflow_run_id=parts.tracker.run_id)
        status = "FINISHED"
    except StopRequested as stop:  # the checkpoint is committed; the same command resumes
        status = "KILLED"
        record_stop(folder, f"step {stop.step}", kind="requested")
    except FloatingPointError as error:
        parts.tracker.set_tags({STOP_TAG: str(error)})
        record_stop(folder, str(error), kind="failed")
    finally:
        parts.tracker.close(status)
        dist.say_end()  # the driver's console prints its closing lines after this one
