"""The ``optim`` section: optimizer, learning-rate schedule, gradient clipping and EMA."""

from __future__ import annotations

from dataclasses import dataclass

from t2t_dist.config.base import check_choice, check_positive, check_range

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    optimizer: str = "adamw"  # "sgd": momentum SGD, the paper's transfer recipe
    lr: float = 5e-4  # at reference_batch; scaled linearly with data.global_batch
    reference_batch: int = 512
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    backbone_lr_scale: float = 1.0  # every parameter but the head trains at lr x this (0.01: transfer)
    epochs: int = 310  # total, cooldown included
    warmup_epochs: float = 10
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: float = 10
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    ema_decay: float = 0.99996  # 0 disables the EMA weights

    def __post_init__(self) -> None:
        check_choice("optim.optimizer", self.optimizer, OPTIMIZERS)
        check_positive("optim.lr", self.lr)
        check_range("optim.momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_range("optim.backbone_lr_scale", self.backbone_lr_scale, 0.0)
        check_positive("optim.reference_batch", self.reference_batch)
        check_range("optim.weight_decay", self.weight_decay, 0.0)
        for i, beta in enumerate(self.betas):
            check_range(f"optim.betas[{i}]", beta, 0.0, 1.0, high_open=True)
        check_positive("optim.eps", self.eps)
        check_positive("optim.epochs", self.epochs)
        check_range("optim.warmup_epochs", self.warmup_epochs, 0.0)
        check_range("optim.cooldown_epochs", self.cooldown_epochs, 0.0)
        check_range("optim.warmup_epochs + optim.cooldown_epochs",
                    self.warmup_epochs + self.cooldown_epochs, high=self.epochs)
        check_range("optim.warmup_lr", self.warmup_lr, 0.0)
        check_range("optim.min_lr", self.min_lr, 0.0)
        check_range("optim.grad_clip", self.grad_clip, 0.0)
        check_range("optim.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
