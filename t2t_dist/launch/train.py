"""The training worker's entry point: build the parts, restore, ``fit``, log the weights, close.

``t2t_dist.launch.driver`` hands ``train_worker`` to the TorchTrainer with the resolved
config as a plain dict.
"""

from __future__ import annotations

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


def train_worker(payload: dict[str, Any]) -> None:
    """Per-worker entry: ``payload`` holds ``config`` (a plain dict) and MLflow ``tags``."""
    config = from_dict(Config, payload["config"])
    parts = build_parts(config, tags=payload["tags"])
    resume = parts.checkpointer.restore(ray.train.get_checkpoint())
    status = "FAILED"
    try:
        fit(config, **parts.fit_kwargs(), resume=resume)
        if config.run.log_model:
            log_final_models(config, parts)
        status = "FINISHED"
    finally:
        parts.tracker.close(status)
