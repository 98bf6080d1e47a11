"""The ``tune`` section: a Ray Tune sweep over any config field, named by its dotted path.

    tune:
      name: depth-width              # running the same sweep name again resumes it
      search: grid                   # grid | random | optuna
      space:
        model.depth: {grid: [7, 10, 14]}
        optim.lr: {loguniform: [1.0e-4, 1.0e-3]}          # random / optuna only
        width:                       # a group: its values set several fields together
          grid: [{model.embed_dim: 256, model.num_heads: 4}, {model.embed_dim: 384, model.num_heads: 6}]

Entries may also be nested (``model: {depth: {grid: [...]}}``), which is what
``--set tune.space.model.depth={grid: [2, 4]}`` writes; both become dotted keys here.
Only names and numbers: the section round-trips through YAML and lands in MLflow params.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from t2t_dist.config.base import ConfigError, check_choice, check_positive, check_range, fail

SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("asha", "fifo")
DISCRETE = ("grid", "choice")
CONTINUOUS = ("uniform", "loguniform", "randint")  # [low, high]; randint includes high
KINDS = DISCRETE + CONTINUOUS
EXAMPLE = "{grid: [7, 14]}, {choice: [...]}, {uniform: [low, high]}, {loguniform: [...]}, {randint: [...]}"


def is_group(entry: dict[str, Any]) -> bool:
    """A group entry's values are mappings of dotted keys, set together (width with heads)."""
    kind, values = next(iter(entry.items()))
    return kind in DISCRETE and all(isinstance(v, dict) for v in values)


def _flat_keys(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"depth": 2}}`` -> ``{"model.depth": 2}`` (group values, nested or dotted)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        flat.update(_flat_keys(value, path) if isinstance(value, dict) else {path: value})
    return flat


def _normalize(space: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Nested or dotted entries -> ``{"model.depth": {"grid": [...]}}``; duplicates refused."""
    flat: dict[str, dict[str, Any]] = {}
    for key, value in space.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in KINDS:
            found = {path: value}
        elif isinstance(value, dict) and value and not set(value) & set(KINDS):
            found = _normalize(value, path)
        else:
            fail(f"tune.space.{path}", value, f"one of {EXAMPLE}")
        for name in found:
            if name in flat:
                raise ConfigError(f"tune.space.{name} is given twice (dotted and nested): "
                                  f"expected one entry per field")
        flat.update(found)
    return flat


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; a range bound is a number."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _check_entry(name: str, entry: dict[str, Any], search: str) -> dict[str, Any]:
    """Validate one entry's shape against its kind and the search; returns it (groups flat)."""
    kind, values = next(iter(entry.items()))
    label = f"tune.space.{name}"
    if kind in DISCRETE:
        if not isinstance(values, list) or not values:
            fail(label, entry, f"{{{kind}: [v1, v2, ...]}} with at least one value")
        kinds = {isinstance(v, dict) for v in values}
        if len(kinds) > 1:
            fail(label, entry, "values that are all plain or all mappings (a group)")
        if kinds == {True}:
            values = [_flat_keys(v) for v in values]
            if search == "optuna":
                fail(label, kind, "plain values with tune.search='optuna' (a group needs grid "
                                  "or random search)")
    else:
        values = [_number(v) for v in values] if isinstance(values, list) else values
        numbers = isinstance(values, list) and len(values) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if not numbers or values[0] >= values[1] + (kind == "randint"):
            fail(label, entry, f"{{{kind}: [low, high]}} with low < high")
        if kind == "loguniform" and values[0] <= 0:
            fail(label, entry, "{loguniform: [low, high]} with 0 < low")
        if kind == "randint" and not all(isinstance(v, int) for v in values):
            fail(label, entry, "{randint: [low, high]} with integers")
    if search == "grid" and kind != "grid":
        fail(label, entry, "{grid: [...]} with tune.search='grid' (or tune.search=random / "
                           "optuna for sampled values)")
    if search == "optuna" and kind == "grid":
        fail(label, entry, "{choice: [...]} or a range with tune.search='optuna' (no grids)")
    return {kind: values}


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    name: str = "sweep"  # the sweep's folder under run.storage_path and its MLflow parent run
    search: str = "grid"
    space: dict[str, Any] = field(default_factory=dict)  # dotted field (or group) -> {kind: values}
    num_samples: int = 1  # grid: repeats of the whole grid; random/optuna: trials drawn
    metric: str = "val/top1"  # reported with every checkpoint (each epoch end)
    mode: str = "max"
    scheduler: str = "asha"  # asha: stop trials behind the others at each rung; fifo: none
    grace_period: int = 1  # epochs a trial always gets before ASHA may stop it
    reduction_factor: float = 2.0  # ASHA keeps the best 1/reduction_factor at each rung
    max_concurrent_trials: int = 0  # 0 = as many as the cluster's CPUs/GPUs hold at once
    max_failures: int = 0  # retries of a failed trial (Ray Train restarts workers first)
    trial_cpus: float = 0.01  # the trial's driver function only waits on its TorchTrainer
    seed: int = 0  # random / optuna sampling

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name != self.name.strip():
            fail("tune.name", self.name, "a non-empty name without '/' or surrounding spaces")
        check_choice("tune.search", self.search, SEARCHES)
        check_choice("tune.scheduler", self.scheduler, SCHEDULERS)
        check_choice("tune.mode", self.mode, ("max", "min"))
        if not self.metric:
            fail("tune.metric", self.metric, "a reported metric such as 'val/top1'")
        check_positive("tune.num_samples", self.num_samples)
        check_positive("tune.grace_period", self.grace_period)
        check_range("tune.reduction_factor", self.reduction_factor, 1.0, low_open=True)
        check_range("tune.max_concurrent_trials", self.max_concurrent_trials, 0)
        check_range("tune.max_failures", self.max_failures, -1)
        check_positive("tune.trial_cpus", self.trial_cpus)
        space = {name: _check_entry(name, entry, self.search)
                 for name, entry in _normalize(self.space).items()}
        object.__setattr__(self, "space", space)  # frozen: the normalized (dotted) form

    def kinds(self) -> dict[str, str]:
        """How each field the space sets is drawn: ``{"optim.lr": "loguniform", ...}``."""
        kinds: dict[str, str] = {}
        for field in self.fields():
            for name, entry in self.space.items():
                if name == field or is_group(entry) and any(
                        field in value for value in next(iter(entry.values()))):
                    kinds.setdefault(field, next(iter(entry)))
        return kinds

    def fields(self) -> list[str]:
        """Every dotted config field the space sets (group members included), in order."""
        names: list[str] = []
        for name, entry in self.space.items():
            values = next(iter(entry.values()))
            keys = [k for value in values for k in value] if is_group(entry) else [name]
            names += [k for k in dict.fromkeys(keys) if k not in names]
        return names


def check_space_fields(tune: TuneConfig, known: list[str]) -> None:
    """Every field the space sets is one of ``known`` (dotted config fields), else one line."""
    for name in tune.fields():
        if name not in known or name.startswith("tune."):
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"tune.space key {name!r} is not a config field: expected a dotted "
                              f"name such as model.depth or optim.lr{hint}")
