"""Parameter and MAC counts, and the model table ``t2t-dist models`` prints.

MACs are FLOPs / 2 as ``torch.utils.flop_counter.FlopCounterMode`` counts them (matmuls,
linear layers, einsums, convolutions), measured on the meta device: no memory, no arithmetic,
so the whole table takes seconds.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from t2t_dist.models.configs import VARIANTS, T2TViTConfig, get_config
from t2t_dist.models.vit import T2TViT


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; total includes frozen ``pos_embed`` and performer ``w``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def _meta_model(config: T2TViTConfig) -> T2TViT:
    with torch.device("meta"):
        return T2TViT(config).eval()


def count_macs(model_or_name: nn.Module | str, img_size: int = 224) -> int:
    """Multiply-accumulates of one forward pass of one image at ``img_size``.

    A name or a model with a ``config`` is rebuilt on the meta device with the eager attention
    (the same math; FlopCounterMode has no formula for the CPU flash-attention kernel). Any
    other module is run as it is on a random image on its own device.
    """
    if isinstance(model_or_name, str) or hasattr(model_or_name, "config"):
        base = get_config(model_or_name) if isinstance(model_or_name, str) else model_or_name.config
        model = _meta_model(dataclasses.replace(base, img_size=img_size, attention="eager"))
        image = torch.empty(1, base.in_chans, img_size, img_size, device="meta")
    else:
        model = model_or_name
        device = next(model.parameters()).device
        image = torch.randn(1, 3, img_size, img_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(image)
    return counter.get_total_flops() // 2


def _figure(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_model_table(names: list[str] | None = None) -> str:
    """Text table: measured params (total, trainable) and GMACs at 224 beside the spec and paper."""
    names = list(VARIANTS) if names is None else names
    configs = [get_config(name) for name in names]  # one-line error on an unknown name
    header = ("name", "tokens", "block", "dim", "depth", "heads", "params", "trainable",
              "GMACs", "spec params", "spec GMACs", "paper M", "paper G", "top-1")
    rows = []
    for config in configs:
        model = _meta_model(dataclasses.replace(config, attention="eager"))
        total, trainable = count_params(model)
        macs = count_macs(model, 224)
        width = (f"{config.embed_dim}-{config.num_features}" if config.block == "dense"
                 else str(config.embed_dim))
        rows.append((config.name, config.tokens, config.block, width, str(config.depth),
                     str(config.num_heads), f"{total:,}", f"{trainable:,}", f"{macs / 1e9:.3f}",
                     _figure(config.spec_params, ","), _figure(config.spec_gmacs, ".3f"),
                     _figure(config.paper_params_m, ".1f"), _figure(config.paper_gmacs, ".1f"),
                     _figure(config.paper_top1, ".1f")))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left = {0, 1, 2}

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])
