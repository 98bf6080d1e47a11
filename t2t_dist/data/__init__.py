"""The data layer: ImageNet-style WebDataset shards, written, checked and streamed from storage.

    from t2t_dist.data import build_train_loader, build_val_loader, BatchAugment, normalize
    train = build_train_loader(data_cfg, img_size=224, rank=0, world_size=1, micro_batch=64)

Modules: ``urls`` (patterns -> shard URLs), ``shards`` (writer, manifest, tar parsing),
``check`` (read back and report), ``order`` (the epoch order), ``stream`` (Range reads of
sample runs), ``transforms`` (CPU decode/crop), ``loader`` (distributed resumable loaders),
``augment`` (device-side batch augmentation), ``digits`` (demo data).
"""

from t2t_dist.data.augment import BatchAugment, normalize, smooth_one_hot
from t2t_dist.data.check import ShardReport, check_shards
from t2t_dist.data.digits import make_digits_dataset
from t2t_dist.data.loader import (SKIP_KINDS, DataError, ShardLoader, build_train_loader,
                                  build_val_loader)
from t2t_dist.data.shards import load_shard_table, manifest_pattern, write_shards
from t2t_dist.data.urls import expand_urls

__all__ = [
    "SKIP_KINDS", "BatchAugment", "DataError", "ShardLoader", "ShardReport", "build_train_loader",
    "build_val_loader", "check_shards", "expand_urls", "load_shard_table", "make_digits_dataset",
    "manifest_pattern", "normalize", "smooth_one_hot", "write_shards",
]
