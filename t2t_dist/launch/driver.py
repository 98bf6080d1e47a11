"""Driver side: resolve the run's paths, connect to Ray (or start one), build the TorchTrainer, fit.

    config = prepare(load_config(...))     # absolute paths, tracking URI; nothing started yet
    line = finished_already(config)        # the run trained to its end before: say so, no Ray
    result = launch(config)                # Ray Train V2 TorchTrainer.fit()
    print(summary(config, result))         # the closing lines

Runs the same under ``python jobs/pretrain.py`` (a local Ray when no cluster is there) and
under ``ray job submit`` (``RAY_ADDRESS`` points at the cluster).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from t2t_dist.config import SAVED_CONFIG, Config, run_dir, run_name, to_dict
from t2t_dist.data import is_demo_url, load_shard_table, map_local_parts, resolve_demo_urls
from t2t_dist.dist import CONSOLE_MARK
from t2t_dist.launch.console import is_verbose, open_console
from t2t_dist.launch.preflight import check_model, is_remote
from t2t_dist.launch.stop import beside_signals, raise_if_stopped, read_finish, stop_on_signals
from t2t_dist.loop import planned_steps
from t2t_dist.storage import Store, open_store
from t2t_dist.tracking import (DESCRIPTION_TAG, RUN_NAME_TAG, fail_fast, find_run, mlflow_client,
                               open_experiment, resolve_tracking_uri)

# DeepSpeed picks its accelerator at import time; on CPU workers it must be told (gloo).
WORKER_ENV_CPU = {"DS_ACCELERATOR": "cpu"}
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # scaling.start_timeout_s


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


def _git(*args: str) -> str:
    """``git ARGS`` in this package's checkout; "" when there is none (an installed package,
    a ``ray job submit --working-dir`` copy) or git is missing."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def source_tags() -> dict[str, str]:
    """MLflow's own source tags, known here, where the job was started and the checkout is:
    the job script (relative to the checkout), its git commit, branch and repository, the
    user. The worker that creates the MLflow run would report Ray's ``default_worker.py``.
    The user is MLflow's choice: the tracking server's user when credentials name one (a
    server with auth records the run under it), else the login name."""
    from mlflow.utils.credentials import read_mlflow_creds  # mlflow: ~1 s to import

    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    top = _git("rev-parse", "--show-toplevel")
    name = str(script) if script else "unknown"
    if script and top and script.is_relative_to(top):
        name = str(script.relative_to(top))
    tags = {"mlflow.source.name": name,
            "mlflow.source.type": "JOB" if submission_id() else "LOCAL",
            "mlflow.user": read_mlflow_creds().username or getpass.getuser(),
            "mlflow.source.git.commit": _git("rev-parse", "HEAD"),
            "mlflow.source.git.branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
            "mlflow.source.git.repoURL": _git("config", "--get", "remote.origin.url")}
    return {key: value for key, value in tags.items() if value}


def run_description(config: Config) -> str:
    """What the MLflow UI shows as the run's description (Markdown)."""
    scaling = config.scaling
    return (f"**{config.model.name}** at {config.model.img_size} px, "
            f"{config.model.num_classes} classes, on {scaling.num_workers} "
            f"{'GPU' if scaling.use_gpu else 'CPU'} workers (global batch "
            f"{config.data.global_batch}). Checkpoints in `{run_dir(config)}`; the same command "
            f"again resumes from the newest complete one.")


def run_tags(config: Config) -> dict[str, str]:
    """MLflow tags known to the driver: the source (``source_tags``), a description, the Ray
    job, the checkpoint location, the model."""
    import ray  # Ray (~1 s with Ray Train) loads once the job starts: bad input fails first

    context = ray.get_runtime_context()
    return {**source_tags(), DESCRIPTION_TAG: run_description(config),
            "ray_job_id": context.get_job_id(),
            "ray_submission_id": submission_id() or "none",
            "checkpoint_location": run_dir(config),
            "model": config.model.name}


def connect(config: Config) -> bool:
    """Connect to the cluster (``RAY_ADDRESS`` / ``scaling.ray_address``) or start a local Ray;
    True when this call did (False: this process was connected already)."""
    import ray  # see run_tags

    if ray.is_initialized():
        return False
    # Unless --verbose, Ray's driver-side warnings (token auth, ...) stay out of the console.
    ray.init(address=config.scaling.ray_address or None,
             logging_level=logging.WARNING if is_verbose() else logging.ERROR)
    return True


def failure_notice(max_failures: int):
    """A Ray Train callback that tells the console, in one line of ours, that a worker failed:
    the quiet console hides Ray's own account of it (``console.open_console``). It runs in
    Ray Train's controller, whose output Ray forwards to the driver like a worker's."""
    import ray.train  # see run_tags

    class FailureNotice(ray.train.UserCallback):
        def after_exception(self, run_context, worker_exceptions) -> None:
            for rank, error in sorted(worker_exceptions.items()):
                reason = (str(error).strip().splitlines() or [""])[0][:200]
                sys.stdout.write(f"{CONSOLE_MARK}WARNING: worker {rank} failed "
                                 f"({type(error).__name__}: {reason}); Ray Train restarts the "
                                 f"workers from the newest complete checkpoint (at most "
                                 f"run.max_failures={max_failures} times; --verbose shows "
                                 f"Ray's account)\n")
            sys.stdout.flush()

    return FailureNotice()


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
    # Ray Train reads it in the driver and hands it to its controller.
    os.environ[START_TIMEOUT_ENV] = f"{scaling.start_timeout_s:g}"
    run_config = ray.train.RunConfig(
        name=name or config.run.name,
        storage_path=config.run.storage_path,
        callbacks=[failure_notice(config.run.max_failures), *callbacks],
        failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.keep_checkpoints),
        worker_runtime_env={"env_vars": env_vars},
    )
    return TorchTrainer(
        worker or train_worker,
        train_loop_config={"config": to_dict(config), "tags": tags},
        scaling_config=ray.train.ScalingConfig(
            num_workers=(scaling.min_workers, scaling.num_workers) if scaling.min_workers
            else scaling.num_workers, elastic_resize_monitor_interval_s=scaling.resize_check_s,
            use_gpu=scaling.use_gpu, resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy),
        run_config=run_config,
    )


def save_resolved_config(config: Config, folder: Store) -> str:
    """Write the resolved config into the run's folder, beside its checkpoints; returns its URL."""
    folder.put(SAVED_CONFIG, yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    return folder.url(SAVED_CONFIG)


def finished_already(config: Config) -> str:
    """One line when this run trained to the end its config plans (its ``finished.json`` and
    that checkpoint are there), "" otherwise: then nothing is started, no model logged again.
    Read from the run's folder and the training shards' manifests, before Ray."""
    done = read_finish(open_store(run_dir(config)))
    if not done:
        return ""
    planned = planned_steps(config, load_shard_table(config.data.train_urls).num_samples)
    if done["step"] < planned:
        return ""  # more to train: optim.epochs or run.max_steps were raised
    numbers = ", ".join(f"{key} {value:.2f}" for key, value in done["metrics"].items()
                        if key in ("val/top1", "val_ema/top1"))
    return (f"{config.run.name} finished already at step {done['step']}"
            f"{f' ({numbers})' if numbers else ''}, checkpoint {run_dir(config)}/"
            f"{done['checkpoint']}: nothing to train; raise optim.epochs or run.max_steps to "
            f"train on, or --set run.name=NEW for a new run")


def open_tracking(config: Config) -> str | None:
    """The MLflow store and experiment, made by the driver (``tracking.open_experiment``):
    their id, or None when MLflow is unreachable (rank 0's tracker then warns once, buffers
    and retries)."""
    fail_fast()  # here and in the closing lines' link: one refused call, not minutes of retries
    try:
        return open_experiment(config.run.tracking_uri, config.run.experiment)
    except Exception:  # connection refused, timeouts, 5xx: the workers' tracker says so
        return None


def launch(config: Config, tags: dict[str, str] | None = None):
    """Connect, build the trainer and train; returns Ray Train's ``Result``. ``tags``: more
    MLflow tags for the run (a fine-tuning run's source weights).

    Raises ``TrainingStopped`` when the workers ended the run early (see ``train_worker``),
    ``RunPreempted`` when they stopped after a checkpoint because the driver got Ctrl-C,
    SIGTERM or SIGUSR1 (``stop.stop_on_signals``). The workers' output reaches the console
    through ``console.open_console``; a Ray this call started is shut down before it returns,
    so nothing of Ray's comes after the closing lines.
    """
    open_tracking(config)
    started = connect(config)
    try:
        folder = open_store(run_dir(config))  # the saved config and the stop files
        save_resolved_config(config, folder)
        trainer = build_trainer(config, {**run_tags(config), **(tags or {})})
        with (open_console(),
              stop_on_signals(folder, check_every=config.run.stop_check_every) as received):
            result = beside_signals(trainer.fit)
        raise_if_stopped(folder, result, received, run_name=config.run.name)
        return result
    finally:
        if started:
            import ray  # see run_tags

            ray.shutdown()


def mlflow_command(tracking_uri: str) -> str:
    """A command that opens the MLflow UI on ``tracking_uri`` as printed, from this directory:
    the ``mlflow`` beside this Python (a virtualenv's, active or not), paths relative to here
    when inside."""
    here = Path.cwd()

    def shown(path: Path) -> str:
        return str(path.relative_to(here)) if path.is_relative_to(here) else str(path)

    beside = Path(sys.executable).parent / "mlflow"
    command = shown(beside) if beside.is_file() else f"{shown(Path(sys.executable))} -m mlflow"
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        tracking_uri = prefix + shown(Path(tracking_uri[len(prefix):]))
    return f"{command} ui --backend-store-uri {tracking_uri}"


def run_address(config: Config) -> str:
    """Where the run's MLflow page is: ``#/experiments/E/runs/R`` on the UI, "" if unknown."""
    try:
        client = mlflow_client(config.run.tracking_uri)
        experiment = client.get_experiment_by_name(config.run.experiment)
        run = experiment and find_run(client, experiment.experiment_id, RUN_NAME_TAG,
                                      config.run.name)
    except Exception:  # MLflow unreachable: the closing lines do without the link
        return ""
    return f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}" if run else ""


def summary(config: Config, result: Any) -> str:
    """The closing lines: the last validation numbers, the checkpoint, how to open the run in
    MLflow (a command that runs as printed, then the run's page)."""
    metrics = result.metrics or {}
    parts = [f"{key} {metrics[key]:.2f}" for key in ("val/top1", "val/top5", "val_ema/top1")
             if key in metrics]
    uri, page = config.run.tracking_uri, run_address(config)
    if uri.startswith(("http://", "https://")):
        mlflow = f"open {uri.rstrip('/')}/{page}" if page else f"open {uri}"
    else:
        mlflow = (f"{mlflow_command(uri)}   then open http://127.0.0.1:5000/{page}")
    return (f"finished {config.run.name}: step {metrics.get('step', '?')}, "
            f"{', '.join(parts) or 'no validation metrics'}\n"
            f"checkpoints: {result.checkpoint.path if result.checkpoint else 'none'}\n"
            f"MLflow: {mlflow}")
