"""Backbone blocks: multi-head self-attention, MLP, and the standard / SE / Ghost / Dense blocks.

Key names follow the released code (``attn.qkv``, ``mlp.fc1``, ``attn.se_layer.fc.0``,
``attn.cheap_operation_q``, ``dense_linear``, ``linear``) so that checkpoints load as-is.
``eager=True`` runs the reference's explicit softmax(q k^T) v; otherwise the same math goes
through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2t_dist.models.configs import T2TViTConfig


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``rate``, rescale the rest."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout: float,
           eager: bool) -> torch.Tensor:
    """softmax(q k^T * scale) v over (B, H, N, d) tensors; dropout on the weights when > 0."""
    if not eager:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
    weights = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, H, N, N)
    if dropout:
        weights = F.dropout(weights, dropout)
    return weights @ v


class SELayer(nn.Module):
    """Squeeze-excitation over channels: token mean -> bottleneck -> sigmoid gate."""

    def __init__(self, dim: int, reduction: int = 16) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(dim // reduction, dim, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        return x * self.fc(x.mean(dim=1, keepdim=True))  # class token included in the mean


class Attention(nn.Module):
    """Multi-head self-attention, optionally followed by squeeze-excitation (T2T-ViT-SE)."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = False,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 se_reduction: int = 0, eager: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.se_layer = SELayer(dim, se_reduction) if se_reduction else None
        self.proj_drop = nn.Dropout(proj_drop)
        self.eager = eager

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, d) each
        drop = self.attn_drop if self.training else 0.0
        x = attend(q, k, v, self.scale, drop, self.eager).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        if self.se_layer is not None:
            x = self.se_layer(x)
        return self.proj_drop(x)


class CheapOperation(nn.Module):
    """GhostNet's depthwise 1x1 Conv1d, i.e. a learned per-channel scale on (B, N, C).

    The weight keeps the Conv1d's (C, 1, 1) shape and U(-1, 1) default init so released
    checkpoints load; the multiply avoids the two transposes a Conv1d over tokens needs.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, 1).uniform_(-1.0, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(-1)


class GhostAttention(nn.Module):
    """Half-width q, k, v projections, each doubled back to dim by a cheap operation."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = False,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 eager: bool = False) -> None:
        super().__init__()
        half = dim // 2
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q, self.k, self.v = (nn.Linear(dim, half, bias=qkv_bias) for _ in range(3))
        self.cheap_operation_q, self.cheap_operation_k, self.cheap_operation_v = (
            CheapOperation(half) for _ in range(3))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.eager = eager

    def _heads(self, x: torch.Tensor, linear: nn.Module, cheap: nn.Module) -> torch.Tensor:
        B, N, C = x.shape
        half = linear(x)
        return torch.cat((half, cheap(half)), dim=2).reshape(B, N, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self._heads(x, self.q, self.cheap_operation_q)
        k = self._heads(x, self.k, self.cheap_operation_k)
        v = self._heads(x, self.v, self.cheap_operation_v)
        drop = self.attn_drop if self.training else 0.0
        x = attend(q, k, v, self.scale, drop, self.eager).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class GhostMlp(nn.Module):
    """fc1 (dim -> dim), cheap copies of its output, concatenated to ``hidden`` -> fc2."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        # Upstream names the copies cheap_operation2, cheap_operation3, ... (mlp_ratio - 1 of them).
        self.cheap_names = [f"cheap_operation{i}" for i in range(2, hidden // dim + 1)]
        for name in self.cheap_names:
            self.add_module(name, CheapOperation(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))  # (B, N, C)
        copies = [self.act(getattr(self, name)(x)) for name in self.cheap_names]
        x = torch.cat([x, *copies], dim=2)  # (B, N, hidden)
        return self.drop(self.fc2(self.drop(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)), both through drop-path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, kind: str = "standard",
                 qkv_bias: bool = False, qk_scale: float | None = None, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-5,
                 se_reduction: int = 16, eager: bool = False) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        attn_args = dict(qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop,
                         eager=eager)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        if kind == "ghost":
            self.attn = GhostAttention(dim, num_heads, **attn_args)
        else:
            self.attn = Attention(dim, num_heads, se_reduction=se_reduction if kind == "se" else 0,
                                  **attn_args)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = GhostMlp(dim, hidden, drop) if kind == "ghost" else Mlp(dim, hidden, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DenseBlock(Block):
    """A standard block whose output is squeezed to ``growth`` channels and appended to its input."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, growth: int, **kwargs) -> None:
        super().__init__(dim, num_heads, mlp_ratio, **kwargs)
        self.dense_linear = nn.Linear(dim, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C) -> (B, N, C + growth)
        return torch.cat([x, self.dense_linear(super().forward(x))], dim=2)


class Transition(nn.Module):
    """Between dense stages: Linear(C -> C/2) + GELU."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


def build_blocks(config: T2TViTConfig) -> nn.ModuleList:
    """The backbone's ``blocks`` list for a T2TViTConfig (dense stages get transitions between)."""
    rates = torch.linspace(0, config.drop_path_rate, config.depth, device="cpu").tolist()
    common = dict(qkv_bias=config.qkv_bias, qk_scale=config.qk_scale, drop=config.drop_rate,
                  attn_drop=config.attn_drop_rate, norm_eps=config.norm_eps,
                  se_reduction=config.se_reduction, eager=config.attention == "eager")
    if config.block != "dense":
        return nn.ModuleList(
            Block(config.embed_dim, config.num_heads, config.mlp_ratio, kind=config.block,
                  drop_path=rate, **common) for rate in rates)
    blocks, dims, index = nn.ModuleList(), config.block_dims(), 0
    for stage, count in enumerate(config.dense_stages):
        for _ in range(count):
            blocks.append(DenseBlock(dims[index], config.num_heads, config.mlp_ratio,
                                     config.growth_rate, drop_path=rates[index], **common))
            index += 1
        if stage < len(config.dense_stages) - 1:
            width = dims[index - 1] + config.growth_rate
            blocks.append(Transition(width, width // 2))
    return blocks
