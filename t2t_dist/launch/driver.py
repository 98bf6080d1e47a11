"""Driver side: resolve the run's paths, connect to Ray (or start one), build the TorchTrainer, fit.

    config = prepare(load_config(...))     # absolute paths, tracking URI; nothing started yet
    result = launch(config)                # Ray Train V2 TorchTrainer.fit()

Runs the same under ``python jobs/pretrain.py`` (a local Ray when no cluster is there) and
under ``ray job submit`` (``RAY_ADDRESS`` points at the cluster).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from t2t_dist.config import SAVED_CONFIG, Config, run_dir, run_name, to_dict
from t2t_dist.data import is_demo_url, map_local_parts, resolve_demo_urls
from t2t_dist.launch.preflight import check_model, is_remote
from t2t_dist.launch.stop import raise_if_stopped, stop_on_signals
from t2t_dist.storage import Store, open_store
from t2t_dist.tracking import resolve_tracking_uri

# DeepSpeed picks its accelerator at import time; on CPU workers it must be told (gloo).
WORKER_ENV_CPU = {"DS_ACCELERATOR": "cpu"}


def absolute_path(path: str, cwd: Path) -> str:
    """``path`` made absolute against ``cwd``; URLs (s3://, file://) stay as they are."""
    if not path or is_remote(path):
        return path
    return os.path.normpath(cwd / Path(path).expanduser())


def resolve_urls(pattern: str, *, cwd: Path, img_size: int) -> str:
    """Shard URLs as workers anywhere can read them: ``digits://`` built in the cache, local
    parts absolute; s3:// and other URLs as they are."""
    if is_demo_url(pattern):
        return resolve_demo_urls(pattern, img_size=img_size)
    return map_local_parts(pattern, lambda part: absolute_path(part, cwd))


def prepare(config: Config, cwd: str | Path | None = None) -> Config:
    """Resolve what depends on where the driver runs: paths, shard URLs, tracking URI, run name.

    Workers may run elsewhere (another node, another working directory), so relative
    paths become absolute here, once. The built-in ``digits://`` data is built on first use,
    after the model is checked (a mistyped ``--model`` fails first, in one line).
    """
    check_model(config)
    cwd = Path(cwd or os.getcwd()).resolve()
    run = dataclasses.replace(config.run, name=run_name(config),
                              storage_path=absolute_path(config.run.storage_path, cwd),
                              tracking_uri=resolve_tracking_uri(config.run.tracking_uri, cwd))
    model = dataclasses.replace(config.model,
                                pretrained=absolute_path(config.model.pretrained or "", cwd) or None)
    img_size = config.model.img_size
    data = dataclasses.replace(
        config.data, train_urls=resolve_urls(config.data.train_urls, cwd=cwd, img_size=img_size),
        val_urls=resolve_urls(config.data.val_urls, cwd=cwd, img_size=img_size))
    return dataclasses.replace(config, model=model, run=run, data=data)


def submission_id() -> str:
    """The ``ray job submit`` id when this driver runs as a submitted job, else ""."""
    try:  # the job supervisor hands the driver its JobConfig, metadata included, as JSON
        job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "") or "{}")
    except ValueError:
        return ""
    return str(job_config.get("metadata", {}).get("job_submission_id", ""))


def run_tags(config: Config) -> dict[str, str]:
    """MLflow tags known to the driver: git commit, Ray job id, checkpoint location."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    import ray  # Ray (~1 s with Ray Train) loads once the job starts: bad input fails first

    context = ray.get_runtime_context()
    return {"git_commit": commit or "unknown",
            "ray_job_id": context.get_job_id(),
            "ray_submission_id": submission_id() or "none",
            "checkpoint_location": run_dir(config),
            "model": config.model.name}


def connect(config: Config) -> None:
    """Connect to the cluster (``RAY_ADDRESS`` / ``scaling.ray_address``) or start a local Ray."""
    import ray  # see run_tags

    if ray.is_initialized():
        return
    ray.init(address=config.scaling.ray_address or None, logging_level="WARNING")


def build_trainer(config: Config, tags: dict[str, str], *, worker=None, callbacks=(),
                  name: str | None = None):
    """The Ray Train V2 TorchTrainer for ``config``: scaling, storage, failures, checkpoints.

    ``worker`` is the per-worker entry (default: training); ``callbacks`` are Ray Train
    callbacks (a Tune sweep passes its report callback); ``name`` overrides ``run.name``.
    """
    import ray.train  # see run_tags; train_worker imports Ray Train and the whole worker side
    from ray.train.torch import TorchTrainer

    from t2t_dist.launch.train_worker import train_worker

    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    env_vars = {} if scaling.use_gpu else dict(WORKER_ENV_CPU)
    env_vars["OMP_NUM_THREADS"] = str(max(1, int(scaling.cpus_per_worker)))
    run_config = ray.train.RunConfig(
        name=name or config.run.name,
        storage_path=config.run.storage_path,
        callbacks=list(callbacks),
        failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.keep_checkpoints),
        worker_runtime_env={"env_vars": env_vars},
    )
    return TorchTrainer(
        worker or train_worker,
        train_loop_config={"config": to_dict(config), "tags": tags},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker=resources, placement_strategy=scaling.placement_strategy),
        run_config=run_config,
    )


def save_resolved_config(config: Config, folder: Store) -> str:
    """Write the resolved config into the run's folder, beside its checkpoints; returns its URL."""
    folder.put(SAVED_CONFIG, yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    return folder.url(SAVED_CONFIG)


def launch(config: Config):
    """Connect, build the trainer and train; returns Ray Train's ``Result``.

    Raises ``TrainingStopped`` when the workers ended the run early (see ``train_worker``),
    ``RunPreempted`` when they stopped after a checkpoint because the driver got SIGTERM or
    SIGUSR1 (``stop.stop_on_signals``).
    """
    connect(config)
    folder = open_store(run_dir(config))  # the saved config and the stop files
    save_resolved_config(config, folder)
    trainer = build_trainer(config, run_tags(config))
    with stop_on_signals(folder, check_every=config.run.stop_check_every) as received:
        result = trainer.fit()
    raise_if_stopped(folder, result, received, run_name=config.run.name)
    return result


def summary(config: Config, result: Any) -> str:
    """The closing lines: the last validation numbers and how to open MLflow."""
    metrics = result.metrics or {}
    parts = [f"{key} {metrics[key]:.2f}" for key in ("val/top1", "val/top5", "val_ema/top1")
             if key in metrics]
    uri = config.run.tracking_uri
    return (f"finished {config.run.name}: step {metrics.get('step', '?')}, "
            f"{', '.join(parts) or 'no validation metrics'}\n"
            f"checkpoints: {result.checkpoint.path if result.checkpoint else 'none'}\n"
            f"MLflow: mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
