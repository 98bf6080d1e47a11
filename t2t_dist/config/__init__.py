"""The configuration layer: one frozen dataclass per concern, one ``Config`` holding them.

    config = load_config("jobs/configs/demo.yaml", model="t2t_vit_7", overrides=["optim.lr=1e-3"])

Precedence: dataclass defaults < YAML file < ``--model`` < ``--set a.b=c`` overrides.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from t2t_dist.config.base import ConfigError, flatten, from_dict, to_dict
from t2t_dist.config.data import DataConfig
from t2t_dist.config.engine import EngineConfig, batch_split, check_precision_device
from t2t_dist.config.model import ModelConfig
from t2t_dist.config.optim import OptimConfig
from t2t_dist.config.run import RunConfig, ScalingConfig
from t2t_dist.config.tune import TuneConfig, check_space_fields

__all__ = [
    "Config", "ConfigError", "DataConfig", "EngineConfig", "ModelConfig", "OptimConfig",
    "RunConfig", "SAVED_CONFIG", "ScalingConfig", "TuneConfig", "apply_overrides", "batch_split",
    "check_precision_device", "flatten", "from_dict", "load_config", "run_dir", "run_name",
    "save_config", "to_dict", "worker_batch_split",
]

SAVED_CONFIG = "t2t_config.yaml"  # the resolved config, saved in the run's folder (``run_dir``)


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)  # used by jobs/sweep.py only

    def __post_init__(self) -> None:
        batch_split(self.data.global_batch, self.scaling.num_workers, self.engine.micro_batch)
        check_elastic_batch(self)
        check_precision_device(self.engine.precision, self.scaling.use_gpu)
        if self.tune.space:
            sections = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tune"}
            check_space_fields(self.tune, list(flatten(to_dict(sections))))


def worker_batch_split(config: Config, world_size: int) -> tuple[int, int]:
    """``(micro_batch, grad_accum_steps)`` on ``world_size`` workers, with micro x accum x
    workers == ``data.global_batch``.

    A fixed group: ``batch_split`` (``engine.micro_batch``; 0 = global batch / workers). An
    elastic group (``scaling.min_workers``) keeps its micro batches at most the full group's
    (``engine.micro_batch``, or global batch / ``scaling.num_workers``) with the fewest
    accumulation steps: fewer workers accumulate more, so memory per worker, the global batch
    and the LR schedule stay what they were.
    """
    global_batch, scaling = config.data.global_batch, config.scaling
    if not scaling.min_workers:
        return batch_split(global_batch, world_size, config.engine.micro_batch)
    largest = config.engine.micro_batch or global_batch // scaling.num_workers
    share, left = divmod(global_batch, world_size)
    for accum in range(1, share + 1) if not left else ():
        if share % accum == 0 and share // accum <= largest:
            return share // accum, accum
    raise ConfigError(f"data.global_batch={global_batch} is invalid on {world_size} workers: "
                      f"expected a multiple of the workers with micro batches of at most {largest}")


def check_elastic_batch(config: Config) -> None:
    """An elastic group may run at any size from ``scaling.min_workers`` to ``num_workers``
    (Ray Train picks what the cluster holds): every size must split the global batch."""
    low, high = config.scaling.min_workers, config.scaling.num_workers
    if not low:
        return
    bad = []
    for workers in range(low, high + 1):
        try:
            worker_batch_split(config, workers)
        except ConfigError:
            bad.append(workers)
    if bad:
        raise ConfigError(
            f"scaling.min_workers={low} is invalid: data.global_batch={config.data.global_batch} "
            f"does not split evenly over {', '.join(map(str, bad))} workers, and Ray Train may run "
            f"the group at any size from min_workers to num_workers({high}); expected "
            f"min_workers >= {max(bad) + 1} or a global batch every size divides")


def run_name(config: Config) -> str:
    """``run.name``, or when empty one derived from what a checkpoint is tied to:
    ``t2t_vit_14-224px-1000cls``."""
    model = config.model
    return config.run.name or f"{model.name}-{model.img_size}px-{model.num_classes}cls"


def run_dir(config: Config, name: str = "") -> str:
    """The folder Ray keeps a run in, ``<run.storage_path>/<name>`` (``name``: ``run.name``):
    a training run's checkpoints, saved config (``SAVED_CONFIG``) and stop records; with a
    sweep's ``tune.name``, the sweep's Tune folder. A local path or a URL (s3://...)."""
    storage, name = config.run.storage_path, name or config.run.name
    return f"{storage.rstrip('/')}/{name}" if storage else name


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is invalid: expected section.field=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=c`` strings (values parsed as YAML) to a nested dict, returning a new one."""
    result = to_dict(data)
    for item in overrides:
        path, value = _parse_override(item)
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} is invalid: {part!r} is not a section")
        node[path[-1]] = value
    return result


def load_config(path: str | Path | None = None, *, model: str | None = None,
                overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config, apply ``--model`` and ``--set`` overrides, and validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist: expected a YAML file "
                              f"such as jobs/configs/demo.yaml")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} is invalid: expected a mapping at top")
    if model:
        data = apply_overrides(data, [f"model.name={model}"])
    data = apply_overrides(data, overrides)
    return from_dict(Config, data)


def save_config(config: Config, path: str | Path) -> None:
    """Write the fully resolved config; ``load_config`` reads it back to an equal Config."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))

