"""DeepSpeed around a plain model: the config dict (a pure function) and engine construction.

    ds_config = deepspeed_config(config.engine, config.optim, global_batch=512, world_size=8,
                                 device_type="cuda")
    engine = build_engine(model, config, world_size=8, device=torch.device("cuda", 0))

The optimizer is always a client torch optimizer (AdamW, or SGD for transfer) with our
no-decay groups and torch's fused kernels (one launch per group on ZeRO's flat partitions,
one pass over memory on a CPU), so no DeepSpeed op (FusedAdam, CPUAdam) is ever compiled;
the LR is set per step by the loop.

What each step costs beyond the plain loop (``benchmarks/engine_overhead.py``), and what we
turn off where it buys nothing:
- ``engine.precision=bf16`` at ZeRO-0 is DeepSpeed's ``torch_autocast`` mode: fp32 weights and
  optimizer, the forward under ``torch.autocast``, exactly the plain AMP loop. DeepSpeed's own
  bf16 mode would wrap the optimizer in its BF16_Optimizer (bf16 weights, fp32 master copies
  partitioned over ranks, per-tensor casts and copies every step). At ZeRO 1-3 bf16 weights
  and gradients are what partitioning is for (half the memory and traffic), so they stay.
- bf16 has no loss scale, so DeepSpeed's per-tensor overflow scan (three kernels per tensor
  per step) is off; the loop stops on a non-finite loss before it logs or commits anything.
- Without clipping (``optim.grad_clip=0``, the recipe) ZeRO-1/2 skip the global gradient
  norm, a cast and a norm kernel per tensor per step.
- One worker at ZeRO-0: the gradient all-reduce is the identity, but DeepSpeed would still
  flatten, scale and copy every gradient back; it is switched off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from t2t_dist.config import (Config, EngineConfig, OptimConfig, batch_split,
                             check_precision_device, worker_batch_split)
from t2t_dist.optim import param_groups

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtypes(engine: EngineConfig) -> tuple[torch.dtype, torch.dtype | None]:
    """(the module's weight dtype, the autocast dtype of its forward or None) under ``engine``:
    bf16 at ZeRO-0 is autocast over fp32 weights, otherwise the weights are in the precision."""
    if engine.precision == "bf16" and engine.zero_stage == 0:
        return torch.float32, torch.bfloat16
    return DTYPES[engine.precision], None


def deepspeed_config(engine: EngineConfig, optim: OptimConfig, *, global_batch: int,
                     world_size: int, device_type: str = "cpu") -> dict:
    """The DeepSpeed config dict for our engine + optim configs on ``world_size`` workers.

    ``device_type`` is "cpu" or "cuda"; fp16 is refused on CPU (no CPU fp16 kernels).
    """
    check_precision_device(engine.precision, use_gpu=device_type != "cpu")
    micro, accum = batch_split(global_batch, world_size, engine.micro_batch)
    zero: dict = {"stage": engine.zero_stage}
    if engine.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=device_type != "cpu",
                    reduce_scatter=True)
    if engine.zero_stage in (1, 2) and not optim.grad_clip and engine.offload_optimizer == "none":
        # Only clipping needs it; DeepSpeed computes it regardless at ZeRO-3 and with offload.
        zero["compute_grad_norm"] = False
    if engine.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": engine.offload_optimizer,
                                     "pin_memory": device_type != "cpu"}
    if engine.offload_params != "none":
        zero["offload_param"] = {"device": engine.offload_params,
                                 "pin_memory": device_type != "cpu"}
    if engine.zero_stage == 3:
        # Gather the full 16-bit weights when saving, so the consolidated model needs no
        # second pass; prefetch and persistence thresholds stay at DeepSpeed's defaults.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    autocast = compute_dtypes(engine)[1] is not None
    config = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": engine.precision == "bf16" and not autocast,
                 "check_grad_overflow": False},
        "torch_autocast": {"enabled": autocast, "dtype": "bfloat16"},
        "fp16": {"enabled": engine.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1},
        # A client torch AdamW is ours by design; with offload DeepSpeed would otherwise
        # insist on building its CPUAdam extension.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # our loop prints progress
        "wall_clock_breakdown": False,
    }
    if optim.optimizer != "adamw":
        # DeepSpeed vets only Adam-family optimizers for ZeRO; SGD's per-parameter momentum
        # lives on the same flat fp32 partitions and works as well.
        config["zero_allow_untested_optimizer"] = True
    return config


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum, the transfer recipe) over the trainable parameters, with
    the recipe's no-decay groups and the backbone's ``lr_scale``."""
    groups = param_groups(model, optim.weight_decay, optim.backbone_lr_scale)
    for group in groups:  # right from the start; set_lr keeps the same ratio per step
        group["lr"] = optim.lr * group["lr_scale"]
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             fused=True)


def _venv_ninja_first() -> None:
    """Put this interpreter's bin folder (the ``ninja`` dependency) first on PATH.

    DeepSpeed JIT-builds ops (on CPU its shared-memory allreduce) with whatever ``ninja``
    PATH finds: none in an unactivated venv, or a system ninja of another version whose
    build log makes every switch between the two rebuild the op (a minute on 2 cores).
    """
    venv_bin = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if (Path(venv_bin) / "ninja").exists() and not path.startswith(venv_bin + os.pathsep):
        os.environ["PATH"] = venv_bin + os.pathsep + path


def build_engine(model: nn.Module, config: Config, *, world_size: int, device: torch.device):
    """Wrap ``model`` in a DeepSpeed engine; the process group must already exist.

    Returns the ``deepspeed.DeepSpeedEngine``; its ``optimizer.param_groups`` take the LR.
    """
    _venv_ninja_first()
    import deepspeed  # heavy import, and it reads DS_ACCELERATOR at import time

    # An elastic group's micro batch depends on how many workers it has now.
    micro_batch, _ = worker_batch_split(config, world_size)
    ds_config = deepspeed_config(dataclasses.replace(config.engine, micro_batch=micro_batch),
                                 config.optim, global_batch=config.data.global_batch,
                                 world_size=world_size, device_type=device.type)
    model = model.to(device)
    optimizer = build_optimizer(model, config.optim)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                      dist_init_required=False)
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        engine.enable_backward_allreduce = False  # an all-reduce over one rank is the identity
    if config.model.compile:
        engine.compile()  # compiles the wrapped module in place; DeepSpeed keeps its hooks
    return engine


def engine_dtype(engine) -> torch.dtype:
    """The dtype the engine's module takes its input in (images are cast to it): bf16 or fp16
    weights; fp32 otherwise, also under ``torch_autocast``, which casts inside the forward."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def set_lr(engine, lr: float) -> None:
    """Set the LR of every parameter group for the next optimizer step: ``lr`` times the
    group's ``lr_scale`` (the backbone's share in transfer learning; 1 otherwise)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@contextlib.contextmanager
def full_named_tensors(engine) -> Iterator[dict[str, torch.Tensor]]:
    """The module's full state (params + buffers) by name; ZeRO-3 partitions gathered.

    Every rank must enter this together under ZeRO-3 (the gather is a collective).
    """
    module = engine.module
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield {name: tensor for name, tensor in module.state_dict().items()}
    else:
        yield module.state_dict()


def consolidated_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full fp32 weights on CPU for export (not ZeRO shards); a collective on every rank.

    Trainable tensors come from the optimizer's fp32 master copy (the module itself may be
    bf16 or partitioned); frozen tensors and buffers from the module.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    full: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        if param.requires_grad:
            master = safe_get_full_fp32_param(param)  # None when the module is the master
            if master is not None:
                full[name] = master.detach().float().cpu().clone()
    with full_named_tensors(engine) as tensors:
        for name, tensor in tensors.items():
            if name not in full:
                tensor = tensor.detach().cpu().clone()
                full[name] = tensor.float() if tensor.is_floating_point() else tensor
    return full
