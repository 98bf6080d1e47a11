"""The DeepSpeed config dict is built from ours by a pure function: every stage and precision."""

import itertools

import pytest

from t2t_dist.config import ConfigError, EngineConfig, OptimConfig
from t2t_dist.engine import batch_split, deepspeed_config

STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16", "fp16")


@pytest.mark.parametrize("stage, precision", list(itertools.product(STAGES, PRECISIONS)))
def test_stage_and_precision(stage, precision):
    engine = EngineConfig(zero_stage=stage, precision=precision)
    config = deepspeed_config(engine, OptimConfig(grad_clip=1.0), global_batch=512, world_size=8,
                              device_type="cuda")
    assert config["zero_optimization"]["stage"] == stage
    assert config["bf16"]["enabled"] == (precision == "bf16")
    assert config["fp16"]["enabled"] == (precision == "fp16")
    assert config["gradient_clipping"] == 1.0
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (512, 64, 1)
    assert "optimizer" not in config and "scheduler" not in config  # ours: client AdamW, per-step LR
    assert ("stage3_gather_16bit_weights_on_model_save" in config["zero_optimization"]) == (stage == 3)
    if precision == "fp16":
        assert config["fp16"]["loss_scale"] == 0  # dynamic loss scaling


@pytest.mark.parametrize("stage, precision", list(itertools.product(STAGES, ("fp32", "bf16"))))
def test_deepspeed_accepts_the_dict(stage, precision):
    """DeepSpeed's own parser (no process group: world size 1) takes every CPU combination."""
    from deepspeed.runtime.config import DeepSpeedConfig

    engine = EngineConfig(zero_stage=stage, precision=precision, micro_batch=16)
    parsed = DeepSpeedConfig(deepspeed_config(engine, OptimConfig(grad_clip=1.0), global_batch=64,
                                              world_size=1))
    assert parsed.zero_optimization_stage == stage
    assert parsed.bfloat16_config.enabled == (precision == "bf16")
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (16, 4)
    assert parsed.gradient_clipping == 1.0


@pytest.mark.parametrize("global_batch, world, micro, expected", [
    (512, 8, 0, (64, 1)),  # one forward per step
    (512, 8, 32, (32, 2)),  # accumulate two micro batches
    (1024, 4, 64, (64, 4)),
    (64, 2, 0, (32, 1)),
])
def test_batch_split(global_batch, world, micro, expected):
    assert batch_split(global_batch, world, micro) == expected
    micro_batch, accum = expected
    assert micro_batch * accum * world == global_batch


def test_batch_split_refuses_uneven_batches():
    with pytest.raises(ConfigError, match=r"data.global_batch=1000 is invalid: expected a multiple "
                                          r"of micro_batch\(64\) x workers\(8\)"):
        batch_split(1000, 8, 64)


@pytest.mark.parametrize("offload_optimizer, offload_params, stage", [
    ("cpu", "none", 2), ("cpu", "cpu", 3), ("nvme", "nvme", 3), ("none", "cpu", 3)])
def test_offload(offload_optimizer, offload_params, stage):
    engine = EngineConfig(zero_stage=stage, offload_optimizer=offload_optimizer,
                          offload_params=offload_params)
    zero = deepspeed_config(engine, OptimConfig(), global_batch=64, world_size=2,
                            device_type="cuda")["zero_optimization"]
    assert zero.get("offload_optimizer", {"device": "none"})["device"] == offload_optimizer
    assert zero.get("offload_param", {"device": "none"})["device"] == offload_params
    if offload_optimizer != "none":
        assert zero["offload_optimizer"]["pin_memory"] is True


def test_client_optimizer_allowed_with_offload():
    """A torch AdamW with offload needs DeepSpeed told not to force its CPUAdam build."""
    config = deepspeed_config(EngineConfig(zero_stage=2, offload_optimizer="cpu"), OptimConfig(),
                              global_batch=64, world_size=2)
    assert config["zero_force_ds_cpu_optimizer"] is False
    assert config["zero_optimization"]["offload_optimizer"]["pin_memory"] is False  # CPU run


def test_fp16_refused_on_cpu():
    with pytest.raises(ConfigError, match="engine.precision='fp16' is invalid on CPU"):
        deepspeed_config(EngineConfig(precision="fp16"), OptimConfig(), global_batch=64,
                         world_size=2, device_type="cpu")


def test_pure_no_process_group_needed():
    import torch.distributed

    deepspeed_config(EngineConfig(), OptimConfig(), global_batch=64, world_size=4)
    assert not torch.distributed.is_initialized()
