"""Preflight: fail in one line, before any cluster resources are taken, on what would fail later."""

from __future__ import annotations

from pathlib import Path

from t2t_dist.config import Config, ConfigError


def is_remote(path: str) -> bool:
    return "://" in path


def check_shards_resolve(field: str, pattern: str):
    """Every shard of ``pattern`` is in its manifest and exists; returns the ``ShardTable``.

    Reads manifests and one listing per shard folder, never a shard. Missing files, a bad
    pattern and unreadable S3 (credentials, endpoint) all become one-line ConfigErrors.
    """
    from t2t_dist.data import load_shard_table
    from t2t_dist.storage import split_url

    if not pattern:
        raise ConfigError(f"data.{field} is empty: expected shard URLs such as "
                          f"s3://bucket/train/name-{{0000..1023}}.tar or a local pattern "
                          f"(`make demo` writes demo_data/)")
    try:
        table = load_shard_table(pattern)
        listings: dict[str, set[str]] = {}
        for url in table.urls:
            folder, _, name = url.rpartition("/")
            if folder not in listings:
                store, _ = split_url(url)
                listings[folder] = set(store.list())
            if name not in listings[folder]:
                raise FileNotFoundError(f"shard {url} does not exist")
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(f"data.{field}={pattern!r} is invalid: {error}") from None
    except Exception as error:  # botocore: no credentials, endpoint unreachable, access denied
        raise ConfigError(f"data.{field}={pattern!r} cannot be read: {type(error).__name__}: "
                          f"{error} (check AWS credentials and AWS_ENDPOINT_URL)") from None
    return table


def preflight(config: Config) -> None:
    """Fail in one line, before any cluster resources are taken, on what would fail later."""
    from t2t_dist.models import list_models

    names = list_models()
    if config.model.name not in names:
        raise ConfigError(f"model.name={config.model.name!r} is invalid: expected one of "
                          f"{', '.join(names)}")
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
