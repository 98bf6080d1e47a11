"""The DeepSpeed config dict is built from ours by a pure function: every stage, precision,
offload and device; GPU-only options (communication overlap, pinned memory) never on CPU."""

import itertools
import json

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
    # bf16 at ZeRO-0 is torch.autocast over fp32 weights (the plain AMP loop); with ZeRO, bf16 weights.
    assert config["bf16"]["enabled"] == (precision == "bf16" and stage > 0)
    assert config["torch_autocast"]["enabled"] == (precision == "bf16" and stage == 0)
    assert config["fp16"]["enabled"] == (precision == "fp16")
    assert config["gradient_clipping"] == 1.0
    assert "compute_grad_norm" not in config["zero_optimization"]  # clipping needs the norm
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
    assert parsed.bfloat16_config.enabled == (precision == "bf16" and stage > 0)
    assert parsed.torch_autocast_enabled == (precision == "bf16" and stage == 0)
    assert not parsed.bfloat16_config.check_grad_overflow
    assert (parsed.train_micro_batch_size_per_gpu, parsed.gradient_accumulation_steps) == (16, 4)
    assert parsed.gradient_clipping == 1.0


@pytest.mark.parametrize("stage", STAGES)
def test_gradient_norm_only_where_clipping_needs_it(stage):
    """ZeRO-1/2 skip the per-tensor norm pass without clipping; DeepSpeed's parser takes it."""
    from deepspeed.runtime.config import DeepSpeedConfig

    for clip, offload in itertools.product((0.0, 1.0), ("none", "cpu")):
        if stage == 0 and offload != "none":
            continue
        engine = EngineConfig(zero_stage=stage, offload_optimizer=offload)
        config = deepspeed_config(engine, OptimConfig(grad_clip=clip), global_batch=64, world_size=1)
        skipped = config["zero_optimization"].get("compute_grad_norm", True) is False
        assert skipped == (stage in (1, 2) and clip == 0.0 and offload == "none")
        assert DeepSpeedConfig(config).zero_config.compute_grad_norm == (not skipped)


@pytest.mark.parametrize("global_batch, world, micro, expected", [
    (512, 8, 0, (64, 1)),  # one forward per step
    (512, 8, 32, (32, 2)),  # accumulate two micro batches
    (1024, 4, 64, (64, 4)),
    (64, 2, 0, (32, 1)),
])
def test_batch_split(global_batch, world, micro, expected):
    got = batch_split(global_batch, world, micro)
    assert got == expected and all(type(n) is int for n in got)  # DeepSpeed wants ints
    micro_batch, accum = expected
    assert micro_batch * accum * world == global_batch


def test_batch_split_refuses_uneven_batches():
    with pytest.raises(ConfigError, match=r"data.global_batch=1000 is invalid: expected a multiple "
                                          r"of engine.micro_batch\(64\) x workers\(8\) = 512: 512 or 1024$"):
        batch_split(1000, 8, 64)
    with pytest.raises(ConfigError, match=r"data.global_batch=4 is invalid: expected a multiple "
                                          r"of the workers \(8\): 8$"):
        batch_split(4, 8)  # fewer images than workers
    assert batch_split(8, 8) == (1, 1)  # one image per worker is fine


# The whole dict for a CPU run with optimizer offload: every option is deliberate.
CPU_ZERO2_OFFLOAD = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 16,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": False,
                          "reduce_scatter": True,
                          "offload_optimizer": {"device": "cpu", "pin_memory": False}},
    "bf16": {"enabled": True, "check_grad_overflow": False},
    "torch_autocast": {"enabled": False, "dtype": "bfloat16"},
    "fp16": {"enabled": False, "loss_scale": 0, "initial_scale_power": 16,
             "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
    "zero_force_ds_cpu_optimizer": False,
    "steps_per_print": 10**9,
    "wall_clock_breakdown": False,
}


def test_cpu_offload_config_in_full():
    engine = EngineConfig(zero_stage=2, precision="bf16", offload_optimizer="cpu", micro_batch=16)
    assert deepspeed_config(engine, OptimConfig(grad_clip=1.0), global_batch=64, world_size=2,
                            device_type="cpu") == CPU_ZERO2_OFFLOAD


# The ZeRO section per stage, offload and device (offload devices: optimizer, parameters).
ZERO_SECTIONS = [
    (0, "none", "none", "cpu", {"stage": 0}),
    (0, "none", "none", "cuda", {"stage": 0}),
    (1, "none", "none", "cpu", {"stage": 1, "contiguous_gradients": True, "overlap_comm": False,
                                "reduce_scatter": True, "compute_grad_norm": False}),
    (1, "none", "none", "cuda", {"stage": 1, "contiguous_gradients": True, "overlap_comm": True,
                                 "reduce_scatter": True, "compute_grad_norm": False}),
    (2, "cpu", "none", "cuda", {"stage": 2, "contiguous_gradients": True, "overlap_comm": True,
                                "reduce_scatter": True,
                                "offload_optimizer": {"device": "cpu", "pin_memory": True}}),
    (3, "cpu", "cpu", "cpu", {"stage": 3, "contiguous_gradients": True, "overlap_comm": False,
                              "reduce_scatter": True,
                              "offload_optimizer": {"device": "cpu", "pin_memory": False},
                              "offload_param": {"device": "cpu", "pin_memory": False},
                              "stage3_gather_16bit_weights_on_model_save": True}),
    (3, "nvme", "nvme", "cuda", {"stage": 3, "contiguous_gradients": True, "overlap_comm": True,
                                 "reduce_scatter": True,
                                 "offload_optimizer": {"device": "nvme", "pin_memory": True},
                                 "offload_param": {"device": "nvme", "pin_memory": True},
                                 "stage3_gather_16bit_weights_on_model_save": True}),
    (3, "none", "cpu", "cuda", {"stage": 3, "contiguous_gradients": True, "overlap_comm": True,
                                "reduce_scatter": True,
                                "offload_param": {"device": "cpu", "pin_memory": True},
                                "stage3_gather_16bit_weights_on_model_save": True}),
]


@pytest.mark.parametrize("stage, offload_optimizer, offload_params, device_type, expected",
                         ZERO_SECTIONS)
def test_zero_section(stage, offload_optimizer, offload_params, device_type, expected):
    engine = EngineConfig(zero_stage=stage, precision="fp32", offload_optimizer=offload_optimizer,
                          offload_params=offload_params)
    config = deepspeed_config(engine, OptimConfig(), global_batch=64, world_size=2,
                              device_type=device_type)
    assert config["zero_optimization"] == expected


def _gpu_only_options(tree, path=""):
    """Paths of options that only make sense with a GPU: overlap of communication with
    compute (CUDA streams) and pinned host memory (page-locked for CUDA copies)."""
    found = []
    for key, value in tree.items():
        if isinstance(value, dict):
            found += _gpu_only_options(value, f"{path}{key}.")
        elif key in ("overlap_comm", "pin_memory") and value:
            found.append(path + key)
    return found


@pytest.mark.parametrize("stage, precision, offload_optimizer, offload_params", [
    (stage, precision, offload_optimizer, offload_params)
    for stage, precision, offload_optimizer, offload_params
    in itertools.product(STAGES, ("fp32", "bf16"), ("none", "cpu"), ("none", "cpu"))
    if (offload_params == "none" or stage == 3) and (offload_optimizer == "none" or stage > 0)])
def test_cpu_config_has_no_gpu_only_options(stage, precision, offload_optimizer, offload_params):
    engine = EngineConfig(zero_stage=stage, precision=precision,
                          offload_optimizer=offload_optimizer, offload_params=offload_params)
    cpu = deepspeed_config(engine, OptimConfig(), global_batch=64, world_size=2, device_type="cpu")
    assert _gpu_only_options(cpu) == []
    cuda = deepspeed_config(engine, OptimConfig(), global_batch=64, world_size=2,
                            device_type="cuda")
    on_gpu = [path for path, wanted in (
        ("zero_optimization.overlap_comm", stage > 0),
        ("zero_optimization.offload_optimizer.pin_memory", offload_optimizer != "none"),
        ("zero_optimization.offload_param.pin_memory", offload_params != "none")) if wanted]
    assert _gpu_only_options(cuda) == on_gpu  # ... which a GPU run does use


def test_deepspeed_reads_the_cpu_options_as_meant():
    """DeepSpeed's own parser sees overlap and pinning off (no misspelt key left at a default)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    engine = EngineConfig(zero_stage=3, precision="fp32", offload_optimizer="cpu",
                          offload_params="cpu", micro_batch=16)
    zero = DeepSpeedConfig(deepspeed_config(engine, OptimConfig(), global_batch=64, world_size=1,
                                            device_type="cpu")).zero_config
    assert zero.overlap_comm is False
    assert zero.offload_optimizer.pin_memory is False and zero.offload_param.pin_memory is False
    assert zero.offload_optimizer.device == "cpu" and zero.offload_param.device == "cpu"
    assert zero.gather_16bit_weights_on_model_save is True


def test_fp16_refused_on_cpu():
    with pytest.raises(ConfigError, match="engine.precision='fp16' is invalid on CPU"):
        deepspeed_config(EngineConfig(precision="fp16"), OptimConfig(), global_batch=64,
                         world_size=2, device_type="cpu")


def test_built_from_its_arguments_alone():
    """Pure: the world size is the argument's (no process group consulted), the result is
    plain JSON (DeepSpeed may write it out), and every call builds a fresh dict."""
    engine, optim = EngineConfig(zero_stage=2), OptimConfig()
    config = deepspeed_config(engine, optim, global_batch=64, world_size=4)
    assert config["train_micro_batch_size_per_gpu"] == 16  # 64 / 4 workers, not 64 / 1
    assert json.loads(json.dumps(config)) == config
    config["zero_optimization"]["stage"] = 3
    assert deepspeed_config(engine, optim, global_batch=64, world_size=4)["zero_optimization"] == {
        "stage": 2, "contiguous_gradients": True, "overlap_comm": False, "reduce_scatter": True,
            "compute_grad_norm": False}
