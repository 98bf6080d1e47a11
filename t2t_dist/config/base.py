"""Shared machinery for the frozen config dataclasses: errors, checks, dict/YAML round-trip.

Every config class is a frozen, keyword-only dataclass holding names and numbers only,
validated in ``__post_init__`` with the helpers below, so every error is one line naming
the field, the bad value and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Iterable


class ConfigError(ValueError):
    """A config value is wrong; the message is one line: field, value, what is accepted."""


def fail(field: str, value: Any, accepted: str) -> typing.NoReturn:
    raise ConfigError(f"{field}={value!r} is invalid: expected {accepted}")


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        fail(field, value, "one of " + ", ".join(repr(c) for c in choices))


def check_range(field: str, value: float, low: float | None = None, high: float | None = None,
                *, low_open: bool = False, high_open: bool = False) -> None:
    """Check ``low <(=) value <(=) high``; either bound may be None. NaN and infinities fail."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(field, value, "a number")
    if not math.isfinite(value):
        fail(field, value, "a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "" if low is None else f"{low} {'<' if low_open else '<='} "
        right = "" if high is None else f" {'<' if high_open else '<='} {high}"
        fail(field, value, f"{left}{field.rsplit('.', 1)[-1]}{right}")


def check_positive(field: str, value: float) -> None:
    check_range(field, value, 0, low_open=True)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config_class(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(field: str, tp: Any, value: Any) -> Any:
    """Turn a YAML value into the annotated type (nested configs, tuples, floats)."""
    if _is_config_class(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            fail(field, value, f"a mapping of {tp.__name__} fields")
        return from_dict(tp, value, prefix=field)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(field, inner[0], value) if len(inner) == 1 else value
    if origin is tuple:
        if isinstance(value, (str, dict)) or not isinstance(value, Iterable):
            fail(field, value, "a list")
        value = list(value)
        if args and args[-1] is not Ellipsis and len(value) != len(args):
            fail(field, value, f"a list of {len(args)} values")
        item_type = args[0] if args else Any
        return tuple(_coerce(field, item_type, v) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            fail(field, value, "a mapping")
        key_type, value_type = args if args else (Any, Any)
        return {_coerce(f"{field}.{k}", key_type, k): _coerce(f"{field}.{k}", value_type, v)
                for k, v in value.items()}
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string
                number = float(value)
            except ValueError:
                pass
        if number is None:
            fail(field, value, "a number")
        if not math.isfinite(number):
            fail(field, value, "a finite number")
        return number
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        fail(field, value, "an integer")
    if tp is bool and not isinstance(value, bool):
        fail(field, value, "true or false")
    if tp is str and not isinstance(value, str):
        fail(field, value, "a string")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build ``cls`` from a plain dict; unknown keys are an error that lists the known ones."""
    types_ = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}: expected one of {', '.join(names)}")
        kwargs[key] = _coerce(path, types_[key], value)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that YAML and MLflow take as-is."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(config)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, for MLflow params."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat
