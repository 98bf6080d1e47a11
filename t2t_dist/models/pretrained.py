"""Load released T2T-ViT weights (or our own) into a model, adapting image size and class count.

Accepted layouts: ``{'state_dict_ema': ..., 'state_dict': ...}`` (EMA preferred), ``{'state_dict': ...}``,
``{'net': ...}`` (the CIFAR fine-tunes), ``{'model': ...}``, or a raw state dict; keys may carry
``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefixes.

``pos_embed`` of another image size is resized: bicubic on the token grid, the class-token row
kept. For the frozen sinusoid table this keeps what the released backbone learned about where a
token sits in the image (a 1-D table regenerated for the new length would move every row to a
different place); pass ``pos_embed="model"`` to keep the model's own freshly built table instead.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Mapping

import torch
import torch.nn.functional as F
from torch import nn

SUB_DICTS = ("state_dict_ema", "state_dict", "net", "model")  # in order of preference
PREFIXES = ("module.", "_orig_mod.")
HEAD_KEYS = ("head.weight", "head.bias")


@dataclass
class LoadReport:
    """What ``load_pretrained`` did; ``str()`` is one line."""

    source: str  # which sub-dict was used ("state_dict_ema", ..., or "raw")
    loaded: int = 0
    prefixes_stripped: list[str] = field(default_factory=list)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    head_dropped: bool = False
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # shape mismatches left out (strict=False)

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source!r}"]
        if self.prefixes_stripped:
            parts.append("stripped " + ", ".join(repr(p) for p in self.prefixes_stripped))
        for key, (old, new) in self.resized.items():
            parts.append(f"resized {key} {list(old)} -> {list(new)}")
        if self.head_dropped:
            parts.append("head dropped (class count differs)")
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("skipped", self.skipped)):
            if keys:
                parts.append(f"{label} {len(keys)}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        return "; ".join(parts)


def read_checkpoint(source: str | os.PathLike | BinaryIO) -> Any:
    """A checkpoint file (a path, or an open binary file such as one read from object
    storage) as ``torch.load`` gives it, tensors on the CPU, unpickling nothing but tensors
    and plain containers."""
    if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):
        raise FileNotFoundError(f"checkpoint {os.fspath(source)!r} does not exist")
    # timm-style training checkpoints also pickle their argparse.Namespace of arguments.
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(source, map_location="cpu", weights_only=True)


def _pick_state_dict(checkpoint: Mapping[str, Any]) -> tuple[str, dict[str, torch.Tensor]]:
    for key in SUB_DICTS:
        if isinstance(checkpoint.get(key), Mapping) and checkpoint[key]:
            return key, dict(checkpoint[key])
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"checkpoint holds no state dict: top-level keys {sorted(checkpoint)[:8]}, "
                         f"expected tensors or one of {', '.join(SUB_DICTS)}")
    return "raw", tensors


def _strip_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    stripped = []
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            stripped.append(prefix)
    return state, stripped


def resize_pos_embed(pos_embed: torch.Tensor, tokens: int) -> torch.Tensor:
    """(1, 1 + g*g, C) -> (1, tokens, C): bicubic on the g x g grid, class-token row kept."""
    old_grid, new_grid = math.isqrt(pos_embed.shape[1] - 1), math.isqrt(tokens - 1)
    if old_grid ** 2 != pos_embed.shape[1] - 1 or new_grid ** 2 != tokens - 1:
        raise ValueError(f"pos_embed {list(pos_embed.shape)} -> {tokens} tokens: expected 1 + a square "
                         "number of tokens on both sides")
    cls_row, grid = pos_embed[:, :1], pos_embed[0, 1:].float()
    grid = grid.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos_embed.dtype)
    return torch.cat([cls_row, grid], dim=1)


def load_pretrained(model: nn.Module, path_or_state: str | os.PathLike | Mapping[str, Any], *,
                    strict: bool = True, pos_embed: str = "resize") -> LoadReport:
    """Load a checkpoint file or in-memory dict into ``model`` and report what was done.

    The head is dropped when its shape differs (another class count) and left missing on purpose;
    ``pos_embed`` is resized to the model's image size (or kept, ``pos_embed="model"``). With
    ``strict`` any other missing, unexpected or mis-shaped key raises a ValueError naming them.
    """
    if pos_embed not in ("resize", "model"):
        raise ValueError(f"pos_embed={pos_embed!r} is invalid: expected 'resize' or 'model'")
    checkpoint = path_or_state if isinstance(path_or_state, Mapping) else read_checkpoint(path_or_state)
    source, state = _pick_state_dict(checkpoint)
    state, stripped = _strip_prefixes(state)
    report = LoadReport(source=source, prefixes_stripped=stripped)
    own = model.state_dict()

    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        if pos_embed == "model":
            state["pos_embed"] = own["pos_embed"]
        else:
            old = tuple(state["pos_embed"].shape)
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], own["pos_embed"].shape[1])
            report.resized["pos_embed"] = (old, tuple(state["pos_embed"].shape))
    if all(k in state and k in own for k in HEAD_KEYS) and any(
            state[k].shape != own[k].shape for k in HEAD_KEYS):
        for key in HEAD_KEYS:
            del state[key]
        report.head_dropped = True

    for key in [k for k in state if k in own and state[k].shape != own[k].shape]:
        report.skipped.append(f"{key} {list(state[key].shape)} vs {list(own[key].shape)}")
        del state[key]
    dropped = set(HEAD_KEYS) if report.head_dropped else set()
    report.missing = [k for k in own if k not in state and k not in dropped]
    report.unexpected = [k for k in state if k not in own]
    if strict and (report.missing or report.unexpected or report.skipped):
        # Checked before loading, so a refused checkpoint leaves the model untouched.
        raise ValueError(f"checkpoint does not match {type(model).__name__} "
                         f"({getattr(getattr(model, 'config', None), 'name', '?')}): {report}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report.loaded = len(state) - len(report.unexpected)
    return report
