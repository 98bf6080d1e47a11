"""The data layer: ImageNet-style WebDataset shards, written, checked and streamed from storage.

    from t2t_dist.data import build_train_loader, build_val_loader, BatchAugment, normalize
    train = build_train_loader(data_cfg, img_size=224, rank=0, world_size=1, micro_batch=64)

Read path: ``urls`` (patterns -> shard URLs), ``manifest`` (the manifest beside the shards,
the shard table), ``order`` (the epoch order), ``tar`` (our byte-offset tar reader),
``stream`` (Range reads of sample runs), ``transforms`` (CPU decode/crop), ``loader``
(distributed resumable loaders), ``augment`` (device-side batch augmentation).
Write and check: ``writer`` (ImageFolder -> shards, with webdataset's TarWriter), ``check``
(read back and report, with webdataset's tar iterators), ``digits`` and ``demo`` (the built-in
demo data, ``digits://``).

Names are imported on first use, so ``import t2t_dist.data.loader`` loads no writer code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BatchAugment": "augment", "normalize": "augment", "smooth_one_hot": "augment",
    "ShardReport": "check", "check_shards": "check",
    "make_digits_dataset": "digits",
    "is_demo_url": "demo", "resolve_demo_urls": "demo",
    "SKIP_KINDS": "loader", "DataError": "loader", "ShardLoader": "loader",
    "build_train_loader": "loader", "build_val_loader": "loader",
    "ShardTable": "manifest", "check_shards_exist": "manifest", "describe_shards": "manifest",
    "load_shard_table": "manifest", "manifest_pattern": "manifest",
    "expand_urls": "urls", "map_local_parts": "urls", "split_patterns": "urls",
    "bad_files_url": "writer", "write_shards": "writer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
