"""Optimizer pieces that are plain arithmetic: parameter groups, the LR schedule, weight EMA.

Nothing here knows about DeepSpeed or a process group; the engine wraps what these build.

    groups = param_groups(model, weight_decay=0.05)              # + backbone_lr_scale=0.01
    schedule = LRSchedule.from_config(config.optim, global_batch=512, steps_per_epoch=2502)
    lr = schedule(step)            # the LR of optimizer step ``step`` (0-based)
    ema = WeightEma(model.state_dict(), decay=0.99996); ema.update(model.state_dict())
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from t2t_dist.config import OptimConfig


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of trainable parameters that get no weight decay.

    The released recipe: 1-D parameters (LayerNorm weights, biases), every ``*.bias``, and
    whatever the model lists in ``no_weight_decay()`` (``cls_token``; ``pos_embed`` is frozen).
    """
    listed = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    names = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in listed \
                or name.rsplit(".", 1)[-1] in listed:
            names.add(name)
    return names


HEAD_PREFIX = "head."  # the classifier; transfer learning trains it at the full LR


def param_groups(model: nn.Module, weight_decay: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    """Optimizer groups: (decay, no decay), each split into head and backbone when
    ``backbone_lr_scale`` != 1; frozen tensors (``requires_grad=False``) left out.

    Every group carries ``lr_scale`` (1 for the head, ``backbone_lr_scale`` for the rest):
    ``engine.set_lr`` multiplies the scheduled LR by it, so the ratio holds on every step.
    Empty groups are dropped.
    """
    skip = no_decay_names(model)
    split = backbone_lr_scale != 1.0
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {
        (decays, head): [] for decays in (True, False) for head in ((False, True) if split else (False,))}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[(name not in skip, split and name.startswith(HEAD_PREFIX))].append(param)
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0,
             "lr_scale": 1.0 if head else backbone_lr_scale}
            for (decays, head), params in groups.items() if params]


def scaled_lr(lr: float, global_batch: int, reference_batch: int) -> float:
    """Linear scaling rule: ``lr`` is tuned at ``reference_batch`` images per step."""
    return lr * global_batch / reference_batch


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    """Per-step linear warmup -> cosine decay -> constant cooldown.

    Step ``s`` (0-based) gets ``warmup_lr`` at s=0, rises linearly to ``peak_lr`` at
    s=warmup_steps, follows a half cosine down to ``min_lr`` at s=warmup_steps+cosine_steps,
    and stays at ``min_lr`` for the cooldown up to ``total_steps``.
    """

    peak_lr: float
    warmup_lr: float
    min_lr: float
    total_steps: int
    warmup_steps: int
    cooldown_steps: int

    def __post_init__(self) -> None:
        if self.warmup_steps + self.cooldown_steps > self.total_steps:
            raise ValueError(f"warmup_steps({self.warmup_steps}) + cooldown_steps"
                             f"({self.cooldown_steps}) exceed total_steps({self.total_steps})")

    @classmethod
    def from_config(cls, optim: OptimConfig, *, global_batch: int,
                    steps_per_epoch: int) -> "LRSchedule":
        """The schedule of ``optim`` with epochs turned into optimizer steps."""
        return cls(peak_lr=scaled_lr(optim.lr, global_batch, optim.reference_batch),
                   warmup_lr=optim.warmup_lr, min_lr=optim.min_lr,
                   total_steps=optim.epochs * steps_per_epoch,
                   warmup_steps=round(optim.warmup_epochs * steps_per_epoch),
                   cooldown_steps=round(optim.cooldown_epochs * steps_per_epoch))

    @property
    def cosine_steps(self) -> int:
        return self.total_steps - self.warmup_steps - self.cooldown_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.cosine_steps, 1)
        if progress >= 1.0:
            return self.min_lr
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1 + math.cos(math.pi * progress))


class WeightEma:
    """Exponential moving average of a model's floating-point tensors, kept in fp32.

    ``update`` takes ``(name, tensor)`` pairs holding FULL tensors: under ZeRO-3 the caller
    gathers them first (see ``t2t_dist.engine.full_named_tensors``). Integer buffers are copied.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                 decay: float, device: torch.device | str = "cpu") -> None:
        self.decay = decay
        self.device = torch.device(device)
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        self.shadow = {name: self._fp32(t) for name, t in items}
        self.updates = 0

    def _fp32(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().to(self.device, copy=True)
        return tensor.float() if tensor.is_floating_point() else tensor

    @torch.no_grad()
    def update(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """``shadow = decay * shadow + (1 - decay) * tensor`` for every floating tensor."""
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        shadows, sources = [], []
        for name, tensor in items:
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                shadows.append(shadow)
                sources.append(tensor.detach().to(self.device, torch.float32))
            else:
                shadow.copy_(tensor)
        # One fused update per step instead of one kernel per tensor (this runs every step).
        torch._foreach_lerp_(shadows, sources, 1.0 - self.decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {name: t.clone() for name, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model: differing keys {sorted(missing)[:5]}")
        self.decay = state["decay"]
        self.updates = state["updates"]
        for name, tensor in state["shadow"].items():
            self.shadow[name].copy_(tensor)
