"""Preflight: fail in one line, before any cluster resources are taken, on what would fail later."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import yaml

from t2t_dist.config import SAVED_CONFIG, Config, ConfigError, flatten, run_dir, to_dict
from t2t_dist.data import check_shards_exist
from t2t_dist.models import list_models, resolve
from t2t_dist.storage import open_store
from t2t_dist.tracking import check_credentials


def is_remote(path: str) -> bool:
    return "://" in path


MAX_SHARDS = 1_000_000  # a brace range past this is a typo (and would take minutes to list)


def brace_count(pattern: str) -> int:
    """How many names the ``{a..b}`` ranges of ``pattern`` expand to, without expanding them."""
    count = 1
    for low, high in re.findall(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.-?\d+)?\}", pattern):
        count *= abs(int(high) - int(low)) + 1
    return count


def check_shards_resolve(field: str, pattern: str):
    """``check_shards_exist`` with its errors as one-line ConfigErrors naming the field."""
    if brace_count(pattern) > MAX_SHARDS:
        raise ConfigError(f"data.{field}={pattern!r} is invalid: it names "
                          f"{brace_count(pattern):,} shards; expected at most {MAX_SHARDS:,}")
    try:
        return check_shards_exist(pattern)
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"data.{field}={pattern!r} is invalid: {error}") from None
    except Exception as error:  # botocore: no credentials, endpoint unreachable, access denied
        raise ConfigError(f"data.{field}={pattern!r} cannot be read: {type(error).__name__}: "
                          f"{error} (check AWS credentials and AWS_ENDPOINT_URL)") from None


# What a checkpoint is tied to: resuming a run with another value of these cannot work.
DEFINING_FIELDS = ("model.name", "model.img_size", "model.num_classes", "engine.zero_stage")
DEFINING_SECTIONS = ("model.",)  # plus architecture overrides a sweep may set
MAY_CHANGE = {"model.pretrained", "model.compile", "model.attention", "model.drop_path_rate"}


def check_resumable(config: Config) -> None:
    """A run name that already holds another model's checkpoints is refused, in one line."""
    store = open_store(run_dir(config))
    try:
        saved = flatten(yaml.safe_load(store.get(SAVED_CONFIG)) or {})
    except FileNotFoundError:
        return  # a new run
    except Exception as error:  # botocore: endpoint unreachable, no credentials, access denied
        raise ConfigError(f"run.storage_path={config.run.storage_path!r} cannot be read: "
                          f"{type(error).__name__}: {error} (check AWS credentials and "
                          f"AWS_ENDPOINT_URL)") from None
    wanted = flatten(to_dict(config))
    keys = [key for key in wanted if key in DEFINING_FIELDS or (
        key.startswith(DEFINING_SECTIONS) and key not in MAY_CHANGE)]
    differ = [key for key in keys if key in saved and saved[key] != wanted[key]]
    if differ:
        was = ", ".join(f"{key}={saved[key]!r}" for key in differ)
        now = ", ".join(f"{key}={wanted[key]!r}" for key in differ)
        raise ConfigError(f"run.name={config.run.name!r} is invalid: {store.url('')} holds a run "
                          f"with {was}, this config has {now}; expected the same to resume it "
                          f"(start another run with --set run.name=NEW or another "
                          f"run.storage_path)")


def check_model_name(name: str) -> None:
    """An unknown variant lists the nearest names first, then all of them."""
    names = list_models()
    if name in names:
        return
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise ConfigError(f"model.name={name!r} is invalid: {hint}expected one of {', '.join(names)}")


def check_model(config: Config) -> None:
    """The variant with this run's overrides is buildable (heads divide widths, the image size
    fits the tokenizer's stride), checked here rather than in every worker."""
    check_model_name(config.model.name)
    resolve(config.model)


def preflight(config: Config) -> None:
    """Fail in one line, before any cluster resources are taken, on what would fail later."""
    check_model(config)
    pretrained = config.model.pretrained
    if pretrained and not is_remote(pretrained) and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained={pretrained!r} is invalid: expected an existing "
                          f"checkpoint file (released .pth.tar or our exported weights)")
    train = check_shards_resolve("train_urls", config.data.train_urls)
    check_shards_resolve("val_urls", config.data.val_urls)
    if train.num_samples < config.data.global_batch:
        raise ConfigError(f"data.global_batch={config.data.global_batch} is invalid: the "
                          f"training shards hold only {train.num_samples} samples")
    if len(train.classes) != config.model.num_classes:
        raise ConfigError(f"model.num_classes={config.model.num_classes} is invalid: expected "
                          f"{len(train.classes)}, the classes of the training shards")
    check_resumable(config)
    check_credentials(config.run.tracking_uri)
