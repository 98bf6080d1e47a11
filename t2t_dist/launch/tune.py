"""Ray Tune sweeps over the pretraining job: each trial is a full Ray Train run.

    config = prepare(load_config("jobs/configs/sweep_hparams.yaml"))
    preflight(config); check_sweep(config)     # bad sweeps fail here, in one line, before Ray
    summary = run_sweep(config)                # Tuner.fit(), or Tuner.restore() of the same name

Ray Train V2's driver-function pattern: the Tune trainable (``run_trial``) builds the
pretraining ``TorchTrainer`` (``driver.build_trainer``) with ``TuneReportCallback`` and fits
it; every checkpoint's ``ray.train.report`` (one per epoch end) is one Tune iteration, the
unit ASHA counts. The trials' configs come from ``launch.sweep``; their MLflow runs (a parent
per sweep, a child per trial, closed here by a Tune callback) from ``launch.report``.
"""

from __future__ import annotations

import math
from typing import Any

import ray
import ray.tune
from ray._raylet import PlacementGroupID
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.util.placement_group import PlacementGroup, remove_placement_group

from t2t_dist.config import Config, TuneConfig, from_dict, to_dict
from t2t_dist.launch.driver import build_trainer, connect, run_tags
from t2t_dist.launch.report import (child_run_id, close_child, finish_parent, log_best,
                                    open_child, open_parent)
from t2t_dist.launch.sweep import min_epochs, sweep_dir, trial_config, trial_run


def tune_space(tune: TuneConfig) -> dict[str, Any]:
    """The ``param_space`` Ray Tune takes: ``{"model.depth": tune.grid_search([...]), ...}``."""
    space: dict[str, Any] = {}
    for name, entry in tune.space.items():
        kind, values = next(iter(entry.items()))
        if kind == "grid":
            space[name] = ray.tune.grid_search(values)
        elif kind == "choice":
            space[name] = ray.tune.choice(values)
        elif kind == "uniform":
            space[name] = ray.tune.uniform(*values)
        elif kind == "loguniform":
            space[name] = ray.tune.loguniform(*values)
        else:  # randint: ours includes high, Tune's excludes it
            space[name] = ray.tune.randint(values[0], values[1] + 1)
    return space


def run_trial(values: dict[str, Any], *, base: dict[str, Any], experiment: str,
              parent_id: str) -> None:
    """One trial (in a Tune trial actor): the pretraining TorchTrainer on the base config with
    ``values`` set, its Train run named from the Tune trial id (``sweep.trial_run``)."""
    sweep = from_dict(Config, base)
    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_run(sweep, values, trial_id)
    open_child(config, sweep=sweep, experiment=experiment, parent_id=parent_id,
               trial_id=trial_id, values=values)
    trainer = build_trainer(config, run_tags(config), callbacks=[TuneReportCallback()])
    trainer.fit()


def release_placement_group(hex_id: str | None) -> None:
    """Remove a stopped trial's worker placement group, which Ray would keep until exit."""
    if not hex_id:
        return
    try:
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(hex_id))))
    except Exception:  # already removed (the trial's run ended on its own)
        pass


class ExplainedASHA(ASHAScheduler):
    """Ray's ASHA, noting why it stopped each trial: ``stops[trial_id]`` is (epoch, the
    trial's value, the rung's bar), the bar being the ``1 - 1/reduction_factor`` quantile of
    the values that trials reaching that rung before it had there."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stops: dict[str, tuple[int, float, float]] = {}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        bar = self._bar(trial, result)
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP and bar is not None:
            self.stops[trial.trial_id] = (result[self._time_attr], result[self._metric], bar)
        return action

    def _bar(self, trial, result: dict) -> float | None:
        """The cutoff this result is about to be compared with (Ray's own bookkeeping,
        ``_Bracket.on_result`` step by step); None when no rung decides here."""
        try:
            bracket = self._trial_info[trial.trial_id]
            now = result[self._time_attr]
            for milestone, recorded in bracket._rungs:  # highest rung first
                if now < milestone or trial.trial_id in recorded:
                    if now >= milestone and not bracket._stop_last_trials:
                        return None
                    continue
                cutoff = bracket.cutoff(recorded)
                return None if cutoff is None else float(cutoff) * self._metric_op
        except (AttributeError, KeyError, TypeError):  # Ray's internals moved: no reason
            return None
        return None


def stop_reason(trial, *, metric: str, epochs: int, scheduler) -> str:
    """How a trial Tune ended in words, from its last report and the scheduler's notes."""
    result = trial.last_result or {}
    epoch = int(result.get("epoch", result.get("training_iteration", 0)) or 0)
    if epoch >= epochs:
        return "completed"
    stop = getattr(scheduler, "stops", {}).get(trial.trial_id)
    if stop is not None:
        at, value, bar = stop
        sign = "<" if getattr(scheduler, "_metric_op", 1.0) > 0 else ">"
        return f"ASHA at epoch {at}: {metric} {value:.1f} {sign} {bar:.1f} (rung bar)"
    return f"stopped by Tune after epoch {epoch} of {epochs}"


class TrialRuns(ray.tune.Callback):
    """Runs in the driver process and keeps each trial's child run current: the best metric
    so far at every report (``report.log_best``), then its status and stop reason
    (``report.close_child``); frees the worker placement group of a trial Tune stopped
    (upstream ray#54305)."""

    def __init__(self, config: Config, experiment: str, scheduler=None) -> None:
        self.config, self.experiment, self.scheduler = config, experiment, scheduler
        self.run_ids: dict[str, str] = {}  # trial id -> child run id

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        tune = self.config.tune
        if tune.metric not in result:
            return
        # Tune summarizes a result into trial.metric_analysis only after the callbacks ran.
        earlier = (trial.metric_analysis or {}).get(tune.metric, {}).get(tune.mode)
        pick = max if tune.mode == "max" else min
        best = result[tune.metric] if earlier is None else pick(earlier, result[tune.metric])
        run_id = self.run_ids.get(trial.trial_id) or child_run_id(
            self.config.run.tracking_uri, self.experiment, trial.trial_id)
        if run_id is not None:
            self.run_ids[trial.trial_id] = run_id
            log_best(self.config.run.tracking_uri, run_id, tune.metric, best,
                     step=int(result.get("step", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._close(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close(trial, failed=True)

    def _close(self, trial, *, failed: bool) -> None:
        tune = self.config.tune
        if failed:
            reason = f"failed (error.txt in {trial.path})"
        else:
            epochs = trial_config(self.config, trial.config).optim.epochs
            reason = stop_reason(trial, metric=tune.metric, epochs=epochs,
                                 scheduler=self.scheduler)
        if not close_child(self.config.run.tracking_uri, self.experiment, trial.trial_id,
                           failed=failed, reason=reason, metric=tune.metric, mode=tune.mode):
            release_placement_group((trial.last_result or {}).get("placement_group_id"))


def concurrent_trials(config: Config) -> int:
    """Trials at once: ``tune.max_concurrent_trials``, bounded by what the cluster holds
    (each trial takes workers x CPUs, and x GPUs on GPU workers)."""
    scaling = config.scaling
    resources = ray.cluster_resources()
    per_trial = scaling.num_workers * scaling.cpus_per_worker + config.tune.trial_cpus
    fits = math.floor(resources.get("CPU", 0) / per_trial + 1e-9)
    if scaling.use_gpu:
        fits = min(fits, math.floor(resources.get("GPU", 0) /
                                    (scaling.num_workers * scaling.gpus_per_worker) + 1e-9))
    fits = max(fits, 1)  # an autoscaling cluster grows on demand
    return min(fits, config.tune.max_concurrent_trials or fits)


def _trial_dirname(trial) -> str:
    return trial.trial_id


def asha_scheduler(config: Config) -> ExplainedASHA:
    """ASHA over epochs (one report each), rungs at grace_period x reduction_factor^k, none
    at the last epoch: a trial stopped at its last report would lose its final save and
    read as early-stopped (max_t below it, and reaching max_t stops nothing). Metric and
    mode come from the TuneConfig."""
    tune = config.tune
    return ExplainedASHA(time_attr="training_iteration", grace_period=tune.grace_period,
                         max_t=max(tune.grace_period, min_epochs(config) - 1),
                         reduction_factor=tune.reduction_factor, stop_last_trials=False)


def build_tuner(config: Config, experiment: str, parent_id: str) -> ray.tune.Tuner:
    """A new Tuner, or the one restored from the sweep's folder (same name: resume)."""
    tune = config.tune
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, base=to_dict(config), experiment=experiment,
                                 parent_id=parent_id),
        {"cpu": tune.trial_cpus})
    param_space = tune_space(tune)
    if ray.tune.Tuner.can_restore(sweep_dir(config)):
        return ray.tune.Tuner.restore(sweep_dir(config), trainable=trainable,
                                      param_space=param_space, resume_errored=True)
    concurrent = concurrent_trials(config)
    if tune.search == "optuna":  # a Searcher: Tune wraps it in a ConcurrencyLimiter
        search, searcher_limit = OptunaSearch(seed=tune.seed), concurrent
    else:  # a SearchGenerator: Tune ignores max_concurrent_trials for it, so it limits itself
        search = BasicVariantGenerator(random_state=tune.seed, max_concurrent=concurrent)
        searcher_limit = None
    scheduler = asha_scheduler(config) if tune.scheduler == "asha" else None
    return ray.tune.Tuner(
        trainable, param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=tune.metric, mode=tune.mode, num_samples=tune.num_samples,
            search_alg=search, scheduler=scheduler,
            max_concurrent_trials=searcher_limit,
            trial_dirname_creator=_trial_dirname),
        run_config=ray.tune.RunConfig(
            name=tune.name, storage_path=config.run.storage_path, verbose=1,
            callbacks=[TrialRuns(config, experiment, scheduler)],
            failure_config=ray.tune.FailureConfig(max_failures=tune.max_failures)))


def run_sweep(config: Config) -> str:
    """Connect, open the MLflow parent, fit (or resume) the sweep, log the results; returns
    the printed table."""
    connect(config)
    experiment, parent_id = open_parent(config)
    tuner = build_tuner(config, experiment, parent_id)
    tuner.fit()
    _, table = finish_parent(config, parent_id)
    return table
