"""Ray Tune sweeps over the pretraining job: each trial is a full Ray Train run.

    config = prepare(load_config("jobs/configs/sweep_hparams.yaml"))
    preflight(config); check_sweep(config)     # bad sweeps fail here, in one line, before Ray
    summary = run_sweep(config)                # Tuner.fit(), or Tuner.restore() of the same name

Ray Train V2's driver-function pattern: the Tune trainable (``run_trial``) builds the
pretraining ``TorchTrainer`` (``driver.build_trainer``) with ``TuneReportCallback`` and fits
it; every checkpoint's ``ray.train.report`` (one per epoch end) is one Tune iteration, the
unit ASHA counts. MLflow: one parent run per sweep, one nested child per trial, which the
trial's rank-0 worker continues (the tracker finds it by run name) and a Tune callback here
closes with the trial's status.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import tempfile
from pathlib import Path
from typing import Any

from t2t_dist.config import Config, ConfigError, TuneConfig, flatten, from_dict, to_dict
from t2t_dist.launch.report import (CSV_NAME, PLOT_NAME, SWEEP_FIELDS_TAG, SWEEP_TAG, STATUS_TAG,
                                    TRIAL_VALUES_TAG, format_table, plot_sweep, sweep_rows,
                                    write_csv)
from t2t_dist.tracking import RUN_NAME_TAG, artifact_location

# What every checkpoint's report carries (loop.fit evaluates at each epoch end, then commits).
REPORTED_METRICS = ("val/top1", "val/top5", "val/loss", "step", "epoch")
EMA_METRICS = ("val_ema/top1", "val_ema/top5", "val_ema/loss")
MAX_CHECKED_TRIALS = 10_000  # discrete combinations validated before Ray starts


def reported_metrics(config: Config) -> tuple[str, ...]:
    """Metrics a trial of ``config`` reports to Tune with every checkpoint."""
    return REPORTED_METRICS + (EMA_METRICS if config.optim.ema_decay > 0 else ())


def set_field(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data["model"]["depth"] = value`` for ``dotted="model.depth"``."""
    *sections, name = dotted.split(".")
    for section in sections:
        data = data.setdefault(section, {})
    data[name] = value


def flat_values(values: dict[str, Any]) -> dict[str, Any]:
    """A trial's space values with groups expanded: ``{"model.depth": 4, "model.embed_dim": 64}``."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        flat.update(value if isinstance(value, dict) else {name: value})
    return flat


def trial_config(config: Config, values: dict[str, Any]) -> Config:
    """``config`` with one trial's values set, the ``tune`` section dropped, the model
    checked against the variant table; a bad combination fails naming the trial's values."""
    from t2t_dist.models import get_config

    data = to_dict(dataclasses.replace(config, tune=TuneConfig()))
    flat = flat_values(values)
    for dotted, value in flat.items():
        set_field(data, dotted, value)
    try:
        trial = from_dict(Config, data)
        model = trial.model
        get_config(model.name, **model.architecture(), img_size=model.img_size,
                   num_classes=model.num_classes, drop_path_rate=model.drop_path_rate)
    except ConfigError as error:
        shown = ", ".join(f"{k}={v!r}" for k, v in flat.items())
        raise ConfigError(f"sweep trial {{{shown}}} is invalid: {error}") from None
    return trial


def checked_values(tune: TuneConfig) -> list[dict[str, Any]]:
    """Every combination of the discrete values, with each range at both of its bounds."""
    axes = []
    for name, entry in tune.space.items():
        values = next(iter(entry.values()))
        axes.append([(name, v) for v in values])  # ranges: [low, high]
    combos = itertools.islice(itertools.product(*axes), MAX_CHECKED_TRIALS)
    return [dict(combo) for combo in combos]


def check_sweep(config: Config) -> int:
    """Fail in one line, before Ray starts, on a sweep that cannot run; returns how many
    value combinations were checked. Couple fields that must agree (heads with width) with a
    group entry; every combination is built and validated here."""
    tune = config.tune
    if not tune.space:
        raise ConfigError("tune.space is empty: expected at least one entry such as "
                          "model.depth: {grid: [7, 14]} (see jobs/configs/sweep_*.yaml)")
    reported = reported_metrics(config)
    if tune.metric not in reported:
        raise ConfigError(f"tune.metric={tune.metric!r} is invalid: the job reports only "
                          f"{', '.join(reported)} with each checkpoint")
    if config.run.checkpoint_every:
        raise ConfigError(f"run.checkpoint_every={config.run.checkpoint_every} is invalid in a "
                          f"sweep: expected 0 (one report per epoch end, the unit of "
                          f"tune.grace_period)")
    combos = checked_values(tune)
    for values in combos:
        trial_config(config, values)
    return len(combos)


def tune_space(tune: TuneConfig) -> dict[str, Any]:
    """The ``param_space`` Ray Tune takes: ``{"model.depth": tune.grid_search([...]), ...}``."""
    from ray import tune as ray_tune

    space: dict[str, Any] = {}
    for name, entry in tune.space.items():
        kind, values = next(iter(entry.items()))
        if kind == "grid":
            space[name] = ray_tune.grid_search(values)
        elif kind == "choice":
            space[name] = ray_tune.choice(values)
        elif kind == "uniform":
            space[name] = ray_tune.uniform(*values)
        elif kind == "loguniform":
            space[name] = ray_tune.loguniform(*values)
        else:  # randint: ours includes high, Tune's excludes it
            space[name] = ray_tune.randint(values[0], values[1] + 1)
    return space


def sweep_dir(config: Config) -> str:
    return f"{config.run.storage_path.rstrip('/')}/{config.tune.name}"


def model_cost(config: Config) -> tuple[int, float]:
    """(parameters, GMACs per image at the run's size) of the trial's model, on the meta device."""
    import torch

    from t2t_dist.models import count_macs, count_params, create_model

    model = config.model
    with torch.device("meta"):
        built = create_model(model.name, **model.architecture(), img_size=model.img_size,
                             num_classes=model.num_classes)
    return count_params(built)[0], count_macs(built, model.img_size) / 1e9


# --- MLflow: the parent run (main process) and one child per trial (trial process) ---

def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def experiment_id(client, config: Config) -> str:
    found = client.get_experiment_by_name(config.run.experiment)
    if found:
        return found.experiment_id
    return client.create_experiment(config.run.experiment, artifact_location=artifact_location(
        config.run.tracking_uri, config.run.experiment))


def _find_run(client, experiment: str, tag: str, value: str):
    runs = client.search_runs([experiment], filter_string=f"tags.`{tag}` = '{value}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def open_parent(config: Config) -> tuple[str, str]:
    """(experiment id, parent run id): the sweep's run, found by name when resuming."""
    client = _client(config.run.tracking_uri)
    experiment = experiment_id(client, config)
    name = config.tune.name
    parent = _find_run(client, experiment, SWEEP_TAG, f"{name}/parent")
    if parent is None:
        parent = client.create_run(experiment, run_name=name, tags={
            SWEEP_TAG: f"{name}/parent", SWEEP_FIELDS_TAG: json.dumps(config.tune.fields())})
        params = {f"tune.{k}": v for k, v in flatten(to_dict(config.tune)).items()}
        params.update({"base.model.name": config.model.name, "base.optim.epochs":
                       config.optim.epochs, "base.scaling.num_workers": config.scaling.num_workers})
        for key, value in params.items():
            client.log_param(parent.info.run_id, key, str(value)[:6000])
    else:
        client.update_run(parent.info.run_id, status="RUNNING")
    return experiment, parent.info.run_id


def open_child(config: Config, *, sweep: str, experiment: str, parent_id: str, trial_id: str,
               values: dict[str, Any]) -> str:
    """The trial's child run (created once; a resumed trial finds it by its run name).

    The trial's rank-0 worker continues it: ``MlflowTracker`` finds runs by run name.
    """
    client = _client(config.run.tracking_uri)
    found = _find_run(client, experiment, RUN_NAME_TAG, config.run.name)
    if found is not None:
        return found.info.run_id
    child = client.create_run(experiment, run_name=config.run.name, tags={
        "mlflow.parentRunId": parent_id, RUN_NAME_TAG: config.run.name,
        SWEEP_TAG: f"{sweep}/trial", "t2t_dist.trial_id": trial_id,
        TRIAL_VALUES_TAG: json.dumps(flat_values(values)), STATUS_TAG: "running"})
    params, gmacs = model_cost(config)
    client.log_metric(child.info.run_id, "model/params", params, step=0)
    client.log_metric(child.info.run_id, "model/gmacs", gmacs, step=0)
    return child.info.run_id


# --- the trainable (runs in a Tune trial actor) ---

def run_trial(values: dict[str, Any], *, base: dict[str, Any], experiment: str,
              parent_id: str) -> None:
    """One trial: the pretraining TorchTrainer on the base config with ``values`` set,
    named from the Tune trial id (so a restored trial resumes its own checkpoints)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from t2t_dist.launch.driver import build_trainer, run_tags

    sweep = from_dict(Config, base)
    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(sweep, values)
    run = dataclasses.replace(config.run, name=f"{sweep.tune.name}-{trial_id}",
                              storage_path=f"{sweep_dir(sweep)}/train")
    config = dataclasses.replace(config, run=run)
    open_child(config, sweep=sweep.tune.name, experiment=experiment, parent_id=parent_id, trial_id=trial_id,
               values=values)
    trainer = build_trainer(config, run_tags(config), callbacks=[TuneReportCallback()])
    trainer.fit()


def _trial_dirname(trial) -> str:
    return trial.trial_id


def make_callback(config: Config, experiment: str):
    """The Tune callback (driver process) that closes each trial's child run with its status
    and frees the worker placement group of a trial Tune stopped (upstream ray#54305)."""
    from ray import tune as ray_tune

    class CloseTrialRuns(ray_tune.Callback):
        def __init__(self, tracking_uri: str, experiment: str) -> None:
            self.tracking_uri, self.experiment = tracking_uri, experiment

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._close(trial, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._close(trial, failed=True)

        def _close(self, trial, *, failed: bool) -> None:
            client = _client(self.tracking_uri)
            child = _find_run(client, self.experiment, "t2t_dist.trial_id", trial.trial_id)
            finished = child is not None and child.info.status == "FINISHED" and not failed
            if not finished:
                release_placement_group((trial.last_result or {}).get("placement_group_id"))
            if child is None:
                return
            if failed:
                status, reason = "FAILED", "failed"
            else:  # the worker closes its run FINISHED at the end of the schedule
                status, reason = ("FINISHED", "completed") if finished else ("KILLED",
                                                                             "early-stopped")
            client.set_tag(child.info.run_id, STATUS_TAG, reason)
            if child.info.status != status:  # a completed run was closed by its worker
                client.set_terminated(child.info.run_id, status=status)

    return CloseTrialRuns(config.run.tracking_uri, experiment)


def release_placement_group(hex_id: str | None) -> None:
    """Remove a stopped trial's worker placement group, which Ray would keep until exit."""
    if not hex_id:
        return
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id))))
    except Exception:  # already removed (the trial's run ended on its own)
        pass


def concurrent_trials(config: Config) -> int:
    """Trials at once: ``tune.max_concurrent_trials``, bounded by what the cluster holds
    (each trial takes workers x CPUs, and x GPUs on GPU workers)."""
    import ray

    scaling = config.scaling
    resources = ray.cluster_resources()
    per_trial = scaling.num_workers * scaling.cpus_per_worker + config.tune.trial_cpus
    fits = math.floor(resources.get("CPU", 0) / per_trial + 1e-9)
    if scaling.use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0) /
                                    (scaling.num_workers * scaling.gpus_per_worker) + 1e-9))
    fits = max(fits, 1)  # an autoscaling cluster grows on demand
    return min(fits, config.tune.max_concurrent_trials or fits)


def build_tuner(config: Config, experiment: str, parent_id: str):
    """A new Tuner, or the one restored from the sweep's folder (same name: resume)."""
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tune = config.tune
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(run_trial, base=to_dict(config), experiment=experiment,
                                 parent_id=parent_id),
        {"cpu": tune.trial_cpus})
    param_space = tune_space(tune)
    if ray_tune.Tuner.can_restore(sweep_dir(config)):
        return ray_tune.Tuner.restore(sweep_dir(config), trainable=trainable,
                                      param_space=param_space, resume_errored=True)
    concurrent = concurrent_trials(config)
    if tune.search == "optuna":  # a Searcher: Tune wraps it in a ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search, searcher_limit = OptunaSearch(seed=tune.seed), concurrent
    else:  # a SearchGenerator: Tune ignores max_concurrent_trials for it, so it limits itself
        search = BasicVariantGenerator(random_state=tune.seed, max_concurrent=concurrent)
        searcher_limit = None
    # max_t never stops a trial: one stopped at its last report would lose its final save.
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=10**6,
                              grace_period=tune.grace_period,
                              reduction_factor=tune.reduction_factor) \
        if tune.scheduler == "asha" else None
    return ray_tune.Tuner(
        trainable, param_space=param_space,
        tune_config=ray_tune.TuneConfig(
            metric=tune.metric, mode=tune.mode, num_samples=tune.num_samples,
            search_alg=search, scheduler=scheduler,
            max_concurrent_trials=searcher_limit,
            trial_dirname_creator=_trial_dirname),
        run_config=ray_tune.RunConfig(
            name=tune.name, storage_path=config.run.storage_path, verbose=1,
            callbacks=[make_callback(config, experiment)],
            failure_config=ray_tune.FailureConfig(max_failures=tune.max_failures)))


def finish_parent(config: Config, parent_id: str) -> tuple[list, str]:
    """results.csv and the top-1 vs cost plot on the parent run; returns (rows, table)."""
    client = _client(config.run.tracking_uri)
    rows = sweep_rows(client, parent_id)
    with tempfile.TemporaryDirectory() as folder:
        write_csv(rows, Path(folder) / CSV_NAME, config.tune.fields(), config.tune.metric)
        plot_sweep(rows, Path(folder) / PLOT_NAME, title=config.tune.name,
                   metric=config.tune.metric)
        client.log_artifact(parent_id, str(Path(folder) / CSV_NAME))
        client.log_artifact(parent_id, str(Path(folder) / PLOT_NAME))
    all_failed = bool(rows) and all(row.status == "failed" for row in rows)
    client.set_terminated(parent_id, status="FAILED" if all_failed else "FINISHED")
    return rows, format_table(rows, config.tune.fields(), config.tune.metric, config.tune.mode)


def run_sweep(config: Config) -> str:
    """Connect, open the MLflow parent, fit (or resume) the sweep, log the results; returns
    the printed table."""
    from t2t_dist.launch.driver import connect

    connect(config)
    experiment, parent_id = open_parent(config)
    tuner = build_tuner(config, experiment, parent_id)
    tuner.fit()
    _, table = finish_parent(config, parent_id)
    return table
