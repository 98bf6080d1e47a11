"""The ``engine`` section: DeepSpeed's ZeRO stage, precision and offload; how the global batch
splits into micro batches per worker."""

from __future__ import annotations

from dataclasses import dataclass

from t2t_dist.config.base import ConfigError, check_choice, check_range

PRECISIONS = ("fp32", "bf16", "fp16")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def batch_split(global_batch: int, world_size: int, micro_batch: int = 0) -> tuple[int, int]:
    """``(micro_batch, grad_accum_steps)`` with ``micro * accum * world == global_batch``.

    ``micro_batch=0`` means one forward per step: ``global_batch / world_size`` per worker.
    A global batch that does not split says which would: the nearest multiples either side.
    """
    unit = (micro_batch or 1) * world_size  # what the global batch must be a multiple of
    if global_batch % unit or global_batch < unit:
        rule = (f"a multiple of engine.micro_batch({micro_batch}) x workers({world_size}) = {unit}"
                if micro_batch else f"a multiple of the workers ({world_size})")
        near = sorted({max(global_batch // unit, 1) * unit, (global_batch // unit + 1) * unit})
        raise ConfigError(f"data.global_batch={global_batch} is invalid: expected {rule}: "
                          f"{' or '.join(map(str, near))}")
    micro = micro_batch or global_batch // world_size
    return micro, global_batch // (micro * world_size)


def check_precision_device(precision: str, use_gpu: bool) -> None:
    """fp16 needs GPU workers: there are no CPU fp16 kernels (DeepSpeed refuses it there)."""
    if precision == "fp16" and not use_gpu:
        raise ConfigError("engine.precision='fp16' is invalid on CPU workers: expected 'bf16' or "
                          "'fp32' (or scaling.use_gpu=true)")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    # 0: every rank holds the whole model and AdamW state (16 bytes per parameter, ~1 GB for
    # t2t_vit_24, the largest): no partitioning work per step. 1-3 partition it over the ranks.
    zero_stage: int = 0
    precision: str = "bf16"
    offload_optimizer: str = "none"
    offload_params: str = "none"  # ZeRO-3 only
    micro_batch: int = 0  # per worker per forward; 0 = global_batch / workers (no accumulation)

    def __post_init__(self) -> None:
        check_choice("engine.zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_choice("engine.precision", self.precision, PRECISIONS)
        check_choice("engine.offload_optimizer", self.offload_optimizer, OFFLOAD_DEVICES)
        check_choice("engine.offload_params", self.offload_params, OFFLOAD_DEVICES)
        check_range("engine.micro_batch", self.micro_batch, 0)
        if self.offload_params != "none" and self.zero_stage != 3:
            check_choice("engine.zero_stage (with offload_params)", self.zero_stage, (3,))
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            check_choice("engine.zero_stage (with offload_optimizer)", self.zero_stage, (1, 2, 3))
