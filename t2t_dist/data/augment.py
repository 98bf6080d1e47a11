"""Device side of the input pipeline: batch augmentation and normalization (kornia).

    augment = BatchAugment(data_cfg, num_classes).to(device)
    images_f, targets = augment(images_uint8, labels)  # (B, 3, H, W) float, (B, C) soft targets
    images_f = normalize(images_uint8, data_cfg)       # eval

Training order (as timm's recipe): RandAugment on [0, 1] images, normalize with the
ImageNet mean/std, random erasing, then Mixup or CutMix with label-smoothed soft targets.

RandAugment: kornia's ``RandAugment(n, m)`` picks one set of ops per call and scales
magnitudes by ``m / 30``; timm's (the recipe's ``rand-m9-mstd0.5``) scales by ``m / 10``
and draws the magnitude per application from N(m, mstd). So the batch is split into
groups of ``_RAND_AUGMENT_GROUP`` samples, each group gets its own ops and a magnitude
``3 * N(m, mstd)`` clipped into kornia's open range (0, 30).

Mixup/CutMix (timm's switching): with probability ``mixup_prob`` a batch is mixed, by
CutMix with probability ``mixup_switch_prob`` when both are enabled. Mixup uses one
``lam ~ Beta(mixup_alpha, mixup_alpha)`` per batch (timm's batch mode); CutMix's box area
is drawn per sample from ``Beta(cutmix_alpha, cutmix_alpha)`` by kornia. Targets:
``(1 - w) * smooth(y) + w * smooth(y_paired)`` with ``w`` the paired image's share of pixels.
"""

from __future__ import annotations

import torch
from kornia.augmentation import RandomCutMixV2, RandomErasing, RandomMixUpV2
from kornia.augmentation.auto import RandAugment
from torch import nn

from t2t_dist.config.data import DataConfig

_RAND_AUGMENT_GROUP = 8  # samples sharing one RandAugment op draw
_KORNIA_PER_TIMM_MAGNITUDE = 3.0  # kornia: m / 30 of the range; timm: m / 10


def normalize(images: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32, scaled to [0, 1] and normalized by ``config.mean/std``."""
    mean = torch.tensor(config.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) -> (B, C): ``1 - smoothing + smoothing / C`` on the label, ``smoothing / C`` elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


class BatchAugment(nn.Module):
    """uint8 images + int labels -> augmented normalized float images + soft targets."""

    def __init__(self, config: DataConfig, num_classes: int):
        super().__init__()
        self.config, self.num_classes = config, num_classes
        self.rand_augment = (RandAugment(n=config.rand_augment_ops, m=15)
                             if config.rand_augment_ops else None)
        self.erasing = (RandomErasing(p=config.random_erasing, scale=(0.02, 1 / 3), ratio=(0.3, 3.3))
                        if config.random_erasing else None)
        self.mixup = RandomMixUpV2(data_keys=["input", "class"]) if config.mixup_alpha else None
        self.cutmix = (RandomCutMixV2(beta=config.cutmix_alpha, use_correct_lambda=True,
                                      data_keys=["input", "class"]) if config.cutmix_alpha else None)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    def _rand_augment(self, images: torch.Tensor) -> torch.Tensor:
        config = self.config
        groups = []
        for group in images.split(_RAND_AUGMENT_GROUP):
            magnitude = config.rand_augment_magnitude + config.rand_augment_magnitude_std * float(torch.randn(()))
            self.rand_augment.m = min(29.9, max(0.1, _KORNIA_PER_TIMM_MAGNITUDE * magnitude))
            groups.append(self.rand_augment(group))
        return torch.cat(groups).clamp_(0.0, 1.0)

    def _mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup or CutMix (or neither); (mixed images, (B,) paired labels, (B,) paired share)."""
        config = self.config
        no_mix = (images, labels, torch.zeros(len(labels), device=images.device))
        if not (self.mixup or self.cutmix) or float(torch.rand(())) >= config.mixup_prob:
            return no_mix
        use_cutmix = self.cutmix is not None and (self.mixup is None
                                                  or float(torch.rand(())) < config.mixup_switch_prob)
        if use_cutmix:
            mixed, mix = self.cutmix(images, labels)
            mix = mix[0]  # (num_mix=1, B, 3) -> (B, 3): label, paired label, original's share
            return mixed, mix[:, 1].long(), 1.0 - mix[:, 2]
        params = self.mixup.forward_parameters(images.shape)
        alpha = torch.tensor(config.mixup_alpha)
        lam = torch.distributions.Beta(alpha, alpha).sample()  # paired image's weight
        params["mixup_lambdas"] = lam.expand(len(labels)).to(images.device, images.dtype)
        mixed, mix = self.mixup(images, labels, params=params)
        return mixed, mix[:, 1].long(), mix[:, 2]

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W), int64 (B,) -> float (B, 3, H, W) normalized, float (B, C) summing to 1."""
        x = images.float() / 255.0
        if self.rand_augment is not None:
            x = self._rand_augment(x)
        x = (x - self.mean) / self.std
        if self.erasing is not None:
            x = self.erasing(x)  # erased to 0 = the mean colour
        x, paired, share = self._mix(x, labels)
        smoothing = self.config.label_smoothing
        targets = smooth_one_hot(labels, self.num_classes, smoothing)
        paired_targets = smooth_one_hot(paired, self.num_classes, smoothing)
        share = share.view(-1, 1).to(targets.dtype)
        return x.contiguous(), (1.0 - share) * targets + share * paired_targets

