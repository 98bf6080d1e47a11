"""Where the shards are and how samples become batches (decode, crop, augment, mix)."""

from __future__ import annotations

from dataclasses import dataclass

from t2t_dist.config.base import check_choice, check_positive, check_range, fail

# How JPEG bytes become pixels: on the CPU in the loader workers with Pillow or simplejpeg
# (libjpeg-turbo both; the same pixels), or on the training GPU with nvJPEG (torchvision).
DECODERS = ("pil", "simplejpeg", "cuda")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    # Shard URLs: s3://bucket/prefix/name-{0000..1023}.tar, local paths, globs, brace patterns.
    train_urls: str = ""
    val_urls: str = ""
    global_batch: int = 512  # images per optimizer step, summed over every worker
    eval_batch: int = 128  # per worker
    loader_workers: int = 4  # DataLoader processes per training worker
    seed: int = 0
    max_bad_fraction: float = 0.01  # skipped (corrupt, truncated, missing, unlabeled) per rank-epoch
    shard_interleave: int = 4  # shards merged at random per group of the epoch order (mixing)
    io_retries: int = 8  # botocore retries per S3 call; a broken stream resumes separately
    decoder: str = "simplejpeg"  # one of DECODERS; same samples, order and crops with each
    # CPU-side crop
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    # device-side batch augmentation
    rand_augment_ops: int = 2  # 0 disables RandAugment
    rand_augment_magnitude: float = 9.0
    rand_augment_magnitude_std: float = 0.5
    random_erasing: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    # evaluation
    eval_crop_pct: float = 0.9  # resize to floor(img_size / crop_pct) (248 at 224), center crop img_size
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        for name in ("global_batch", "eval_batch"):
            check_positive(f"data.{name}", getattr(self, name))
        check_range("data.loader_workers", self.loader_workers, 0)
        check_positive("data.shard_interleave", self.shard_interleave)
        check_range("data.io_retries", self.io_retries, 0)
        check_range("data.seed", self.seed, 0)  # numpy seeds are non-negative
        check_choice("data.decoder", self.decoder, DECODERS)
        check_range("data.max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        for name in ("hflip", "random_erasing", "mixup_prob", "mixup_switch_prob"):
            check_range(f"data.{name}", getattr(self, name), 0.0, 1.0)
        check_range("data.label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        check_range("data.eval_crop_pct", self.eval_crop_pct, 0.0, 1.0, low_open=True)
        check_range("data.rand_augment_ops", self.rand_augment_ops, 0)
        check_range("data.mixup_alpha", self.mixup_alpha, 0.0)
        check_range("data.cutmix_alpha", self.cutmix_alpha, 0.0)
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            fail("data.crop_scale", list(self.crop_scale), "[low, high] with 0 < low <= high <= 1")
        low, high = self.crop_ratio
        if not 0 < low <= high:
            fail("data.crop_ratio", list(self.crop_ratio), "[low, high] with 0 < low <= high")
