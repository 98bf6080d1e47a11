"""Tokenizers: the Tokens-to-Token module (performer or transformer T2T layers), its
three-convolution ablation (T2T-ViTc), and a plain ViT patch embedding.

T2T at 224 px, B images:
    (B, 3, 224, 224) -soft split 7/4/2-> (B, 3136, 147) -T2T layer-> (B, 3136, 64)
    -restructurize-> (B, 64, 56, 56) -soft split 3/2/1-> (B, 784, 576) -T2T layer-> (B, 784, 64)
    -restructurize-> (B, 64, 28, 28) -soft split 3/2/1-> (B, 196, 576) -project-> (B, 196, dim)
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from t2t_dist.models.blocks import Mlp, attend
from t2t_dist.models.configs import T2TViTConfig


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """(1, positions, dim) table: angle(p, j) = p / 10000^(2 floor(j/2) / dim); sin even j, cos odd j.

    Computed in float64 and cast to float32, as the reference does with numpy.
    """
    position = torch.arange(positions, dtype=torch.float64).unsqueeze(1)  # (P, 1)
    exponent = 2 * torch.div(torch.arange(dim), 2, rounding_mode="floor").double() / dim
    angle = position / torch.pow(10000.0, exponent)  # (P, dim)
    table = torch.empty_like(angle)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float().unsqueeze(0)


def performer_features(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Positive random features phi(x) = exp(x w^T - |x|^2 / 2) / sqrt(m): (B, T, e) -> (B, T, m)."""
    return torch.exp(x @ w.t() - x.square().sum(dim=-1, keepdim=True) / 2) / math.sqrt(w.shape[0])


def performer_attention(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                        eps: float = 1e-8) -> torch.Tensor:
    """The reference's linear-kernel attention: (phi(q) (phi(k)^T v)) / (phi(q) sum_t phi(k) + eps).

    Inputs (B, T, e) in float32; output (B, T, e). Plain matmuls, same arithmetic as the
    reference's einsums.
    """
    kp, qp = performer_features(k, w), performer_features(q, w)  # (B, T, m)
    kv = kp.transpose(1, 2) @ v  # (B, m, e)
    normalizer = qp @ kp.sum(dim=1).unsqueeze(2)  # (B, T, 1)
    return (qp @ kv) / (normalizer + eps)


def performer_attention_reference(k: torch.Tensor, q: torch.Tensor, v: torch.Tensor,
                                  w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The reference's own einsum formulation (``attention="eager"``), kept for parity checks."""
    m, emb = w.shape

    def prm_exp(x: torch.Tensor) -> torch.Tensor:
        xd = (x * x).sum(dim=-1, keepdim=True).repeat(1, 1, m) / 2
        return torch.exp(torch.einsum("bti,mi->btm", x, w) - xd) / math.sqrt(m)

    kp, qp = prm_exp(k), prm_exp(q)
    normalizer = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(dim=2)  # (B, T, 1)
    kptv = torch.einsum("bin,bim->bnm", v, kp)  # (B, e, m)
    return torch.einsum("bti,bni->btn", qp, kptv) / (normalizer.repeat(1, 1, emb) + eps)


class PerformerT2TLayer(nn.Module):
    """T2T layer with a one-head performer (t2t_vit_N). Skip through v, since widths differ."""

    def __init__(self, dim: int, emb: int = 64, kernel_ratio: float = 0.5, dropout: float = 0.1,
                 eager: bool = False) -> None:
        super().__init__()
        self.emb = emb
        self.kqv = nn.Linear(dim, 3 * emb)  # order k, q, v (with bias)
        self.dp = nn.Dropout(dropout)
        self.proj = nn.Linear(emb, emb)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(emb)
        self.mlp = nn.Sequential(nn.Linear(emb, emb), nn.GELU(), nn.Linear(emb, emb), nn.Dropout(dropout))
        m = int(emb * kernel_ratio)
        # Frozen random features: m orthogonal rows of norm sqrt(m), drawn once, kept in the state_dict.
        w = torch.empty(m, emb)
        if w.device.type != "meta":
            nn.init.orthogonal_(w)
        self.w = nn.Parameter(w * math.sqrt(m), requires_grad=False)
        self.eager = eager

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, dim) -> (B, T, emb)
        k, q, v = self.kqv(self.norm1(x)).split(self.emb, dim=-1)
        kernel = performer_attention_reference if self.eager else performer_attention
        # exp() and the division overflow or round eps to 0 in half precision: stay in float32.
        device = x.device.type
        with torch.autocast(device, enabled=False) if device != "meta" else contextlib.nullcontext():
            y = kernel(k.float(), q.float(), v.float(), self.w.float()).to(v.dtype)
        y = v + self.dp(self.proj(y))
        return y + self.mlp(self.norm2(y))


class TokenAttention(nn.Module):
    """One-head attention of a transformer T2T layer; scaled by the INPUT width, skip through v."""

    def __init__(self, dim: int, emb: int, eager: bool = False) -> None:
        super().__init__()
        self.emb = emb
        self.scale = dim ** -0.5
        self.qkv = nn.Linear(dim, emb * 3, bias=False)  # order q, k, v
        self.proj = nn.Linear(emb, emb)
        self.eager = eager

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, dim) -> (B, T, emb)
        q, k, v = self.qkv(x).unsqueeze(1).split(self.emb, dim=-1)  # (B, 1, T, emb) each
        y = attend(q, k, v, self.scale, 0.0, self.eager)
        return (v + self.proj(y)).squeeze(1)


class TransformerT2TLayer(nn.Module):
    """T2T layer with a one-head transformer (t2t_vit_t_N); no dropout, no drop-path."""

    def __init__(self, dim: int, emb: int = 64, eager: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, emb, eager)
        self.norm2 = nn.LayerNorm(emb)
        self.mlp = Mlp(emb, emb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def soft_split(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """Overlapping patches as tokens: (B, C, H, W) -> (B, L, C * kernel^2), features (c, ki, kj).

    Eager runs ``nn.Unfold``'s im2col. Under torch.compile, inductor would lower im2col (and its
    col2im backward) to slow gathers and scatters, so the same patches are taken as kernel^2
    strided slices of the channels-last view instead, which fuse into plain copies.
    """
    if not torch.compiler.is_compiling():
        return F.unfold(x, kernel, padding=padding, stride=stride).transpose(1, 2)
    return soft_split_slices(x.permute(0, 2, 3, 1), kernel, stride, padding)


def soft_split_slices(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """``soft_split`` of a channels-last image (B, H, W, C) by strided slicing; identical output."""
    B, H, W, C = x.shape
    x = F.pad(x, (0, 0, padding, padding, padding, padding))
    out_h, out_w = (H + 2 * padding - kernel) // stride + 1, (W + 2 * padding - kernel) // stride + 1
    patches = [x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
               for i in range(kernel) for j in range(kernel)]  # k*k of (B, out_h, out_w, C)
    return torch.stack(patches, dim=-1).reshape(B, out_h * out_w, C * kernel * kernel)


def restructurize(x: torch.Tensor) -> torch.Tensor:
    """Tokens back to an image: (B, H*W, C) -> (B, C, H, W), tokens row-major."""
    B, L, C = x.shape
    side = math.isqrt(L)
    return x.transpose(1, 2).reshape(B, C, side, side)


class T2TModule(nn.Module):
    """Two T2T iterations and a final soft split + projection (tokens 'performer' or 'transformer')."""

    def __init__(self, config: T2TViTConfig) -> None:
        super().__init__()
        emb, eager = config.token_dim, config.attention == "eager"
        first, second = config.in_chans * 7 * 7, emb * 3 * 3
        if config.tokens == "performer":
            self.attention1 = PerformerT2TLayer(first, emb, config.kernel_ratio, config.t2t_dropout, eager)
            self.attention2 = PerformerT2TLayer(second, emb, config.kernel_ratio, config.t2t_dropout, eager)
        else:
            self.attention1 = TransformerT2TLayer(first, emb, eager)
            self.attention2 = TransformerT2TLayer(second, emb, eager)
        self.project = nn.Linear(second, config.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, H/16 * W/16, dim)
        x = self.attention1(soft_split(x, 7, 4, 2))
        x = self.attention2(soft_split(restructurize(x), 3, 2, 1))
        return self.project(soft_split(restructurize(x), 3, 2, 1))


class ConvTokens(nn.Module):
    """T2T-ViTc: three convolutions (kernels 7, 3, 3; strides 4, 2, 2) in place of the T2T module.

    Names follow the reference's unfinished 'convolution' branch. GELU between the convolutions
    is our choice (the paper does not say); without it the three would collapse into one.
    """

    def __init__(self, config: T2TViTConfig) -> None:
        super().__init__()
        emb = config.token_dim
        self.soft_split0 = nn.Conv2d(config.in_chans, emb, 7, stride=4, padding=2)
        self.soft_split1 = nn.Conv2d(emb, emb, 3, stride=2, padding=1)
        self.project = nn.Conv2d(emb, config.embed_dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.soft_split1(F.gelu(self.soft_split0(x))))
        return self.project(x).flatten(2).transpose(1, 2)  # (B, N, dim)


class PatchEmbed(nn.Module):
    """ViT tokenizer: non-overlapping patch_size^2 patches through one strided convolution."""

    def __init__(self, config: T2TViTConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_chans, config.embed_dim, p, stride=p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)


def build_tokenizer(config: T2TViTConfig) -> tuple[str, nn.Module]:
    """(attribute name, module): ``tokens_to_token`` as upstream, ``patch_embed`` as timm's ViT."""
    if config.tokens == "patch":
        return "patch_embed", PatchEmbed(config)
    if config.tokens == "convolution":
        return "tokens_to_token", ConvTokens(config)
    return "tokens_to_token", T2TModule(config)
