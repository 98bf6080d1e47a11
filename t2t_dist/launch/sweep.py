"""A sweep's trials as configs, checked before Ray starts: no Ray, no MLflow here.

    checked = check_sweep(config)          # every discrete combination built and validated
    trial = trial_config(config, values)   # one trial's config: the values set, tune dropped

Ray Tune runs the sweep (``launch.tune``); MLflow holds its runs and results
(``launch.report``).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch

from t2t_dist.config import Config, ConfigError, TuneConfig, from_dict, run_dir, to_dict
from t2t_dist.models import T2TViT, count_macs, count_params, resolve

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
    data = to_dict(dataclasses.replace(config, tune=TuneConfig()))
    flat = flat_values(values)
    for dotted, value in flat.items():
        set_field(data, dotted, value)
    try:
        trial = from_dict(Config, data)
        resolve(trial.model)
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
    epochs = min(trial_config(config, values).optim.epochs for values in combos)
    if tune.scheduler == "asha" and tune.grace_period >= epochs:
        raise ConfigError(f"tune.grace_period={tune.grace_period} is invalid with optim.epochs="
                          f"{epochs}: expected fewer epochs than a trial runs (ASHA decides at "
                          f"the end of epoch grace_period), or tune.scheduler=fifo")
    return len(combos)


def min_epochs(config: Config) -> int:
    """Epochs (reports) of the sweep's shortest trial."""
    if "optim.epochs" not in config.tune.fields():
        return config.optim.epochs
    return min(trial_config(config, values).optim.epochs for values in checked_values(config.tune))


def sweep_dir(config: Config) -> str:
    """The sweep's Tune folder, ``<run.storage_path>/<tune.name>``; its trials' Train runs go
    under ``train/`` there."""
    return run_dir(config, config.tune.name)


def trial_run(sweep: Config, values: dict[str, Any], trial_id: str) -> Config:
    """The Train run of one trial: ``trial_config`` named from the Tune trial id (so a
    restored trial resumes its own checkpoints), stored under the sweep's folder."""
    config = trial_config(sweep, values)
    return dataclasses.replace(config, run=dataclasses.replace(
        config.run, name=f"{sweep.tune.name}-{trial_id}", storage_path=f"{sweep_dir(sweep)}/train"))


def model_cost(config: Config) -> tuple[int, float]:
    """(parameters, GMACs per image at the run's size) of the trial's model, on the meta device."""
    with torch.device("meta"):
        built = T2TViT(resolve(config.model))
    return count_params(built)[0], count_macs(built, config.model.img_size) / 1e9
