"""Device-side batch augmentation (kornia) and normalization."""

from __future__ import annotations

import torch

from t2t_dist.config import DataConfig
from t2t_dist.data import BatchAugment, normalize
from t2t_dist.data.augment import smooth_one_hot


def _batch(size=16, side=32):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, side, side), dtype=torch.uint8, generator=generator)
    return images, torch.arange(size) % 10


def test_batch_augment_shapes_dtypes_and_soft_targets():
    torch.manual_seed(0)
    augment = BatchAugment(DataConfig(), num_classes=10)
    images, labels = _batch()
    for _ in range(4):  # mixup, cutmix or neither: all paths give the same contract
        out, targets = augment(images, labels)
        assert out.shape == images.shape and out.dtype == torch.float32
        assert targets.shape == (16, 10) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(16), atol=1e-5)
        assert torch.isfinite(out).all() and (targets >= 0).all()


def test_no_mixing_gives_smoothed_one_hot_and_plain_normalization():
    config = DataConfig(rand_augment_ops=0, random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)
    images, labels = _batch()
    out, targets = BatchAugment(config, num_classes=10)(images, labels)
    assert torch.allclose(out, normalize(images, config))
    assert torch.allclose(targets, smooth_one_hot(labels, 10, 0.1))
    assert torch.allclose(targets.max(1).values, torch.full((16,), 0.9 + 0.01))


def test_cutmix_targets_follow_the_pasted_area():
    torch.manual_seed(1)
    config = DataConfig(rand_augment_ops=0, random_erasing=0.0, mixup_alpha=0.0, label_smoothing=0.0)
    # Constant images, one value per sample: the pasted share is countable per pixel.
    labels = torch.arange(8)
    images = (labels * 30).to(torch.uint8).view(8, 1, 1, 1).expand(8, 3, 32, 32).contiguous()
    out, targets = BatchAugment(config, num_classes=8)(images, labels)
    own = (out == normalize(images, config)).all(1).float().mean((1, 2))  # (B,) own pixels
    assert (own < 1).any()  # something was pasted
    # A self-paired row pastes its own values: own share 1, target 1; the formula still holds.
    assert torch.allclose(targets[torch.arange(8), labels], own, atol=1e-5)


def test_mixup_targets_match_the_image_blend():
    torch.manual_seed(2)
    config = DataConfig(rand_augment_ops=0, random_erasing=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
    labels = torch.arange(8)
    images = (labels * 30).to(torch.uint8).view(8, 1, 1, 1).expand(8, 3, 4, 4).contiguous()
    out, targets = BatchAugment(config, num_classes=8)(images, labels)
    values = normalize(images, config)[:, 0, 0, 0]  # (B,) per-sample constant (channel 0)
    blended = targets @ values  # the target-weighted mix of sample values
    assert torch.allclose(out[:, 0, 0, 0], blended, atol=1e-4)
