"""The transfer recipe's optimizer pieces: SGD, backbone LR scale kept on every step, config checks."""

import pytest
import torch

from t2t_dist.config import ConfigError, OptimConfig, load_config
from t2t_dist.engine import build_optimizer, set_lr
from t2t_dist.models import create_model
from t2t_dist.optim import param_groups


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("t2t_vit_tiny", img_size=32, num_classes=5)


def test_backbone_scale_splits_head_from_backbone(model):
    groups = param_groups(model, weight_decay=0.05, backbone_lr_scale=0.01)
    head = {id(p) for p in model.head.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # each exactly once
    for group in groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1, "a group is all head or all backbone"
        assert group["lr_scale"] == (1.0 if in_head.pop() else 0.01)
    decays = {(g["lr_scale"], g["weight_decay"]) for g in groups}
    assert decays == {(1.0, 0.05), (1.0, 0.0), (0.01, 0.05), (0.01, 0.0)}
    # Without a scale: the two recipe groups, unchanged.
    plain = param_groups(model, weight_decay=0.05)
    assert [g["lr_scale"] for g in plain] == [1.0, 1.0] and len(plain) == 2


class _Engine:  # set_lr only reads engine.optimizer.param_groups
    def __init__(self, optimizer):
        self.optimizer = optimizer


@pytest.mark.parametrize("optimizer, cls", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_set_lr_keeps_the_ratio_on_every_step(model, optimizer, cls):
    optim = build_optimizer(model, OptimConfig(optimizer=optimizer, lr=0.05, momentum=0.9,
                                               backbone_lr_scale=0.01, weight_decay=5e-4))
    assert isinstance(optim, cls)
    if optimizer == "sgd":
        assert all(g["momentum"] == 0.9 for g in optim.param_groups)
    head = {id(p) for p in model.head.parameters()}
    for lr in (0.05, 0.0123, 1e-5):
        set_lr(_Engine(optim), lr)
        for group in optim.param_groups:
            expected = lr if id(group["params"][0]) in head else lr * 0.01
            assert group["lr"] == pytest.approx(expected, rel=1e-12)


def test_sgd_step_moves_backbone_a_hundredth_of_the_head(model):
    """One momentum-free SGD step without decay: the update is lr_scale x lr x grad."""
    optim = build_optimizer(model, OptimConfig(optimizer="sgd", lr=0.1, momentum=0.0,
                                               weight_decay=0.0, backbone_lr_scale=0.01))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(4, 3, 32, 32)).logsumexp(-1).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optim.step()
    for name, param in model.named_parameters():
        if name in grads:
            scale = 1.0 if name.startswith("head.") else 0.01
            torch.testing.assert_close(param.detach(), before[name] - 0.1 * scale * grads[name],
                                       rtol=0, atol=1e-7)
            if name.startswith("head."):
                assert not torch.equal(param.detach(), before[name])


@pytest.mark.parametrize("override, message", [
    ("optim.optimizer=lamb", "optim.optimizer='lamb' is invalid: expected one of 'adamw', 'sgd'"),
    ("optim.momentum=1.5", "optim.momentum=1.5 is invalid"),
    ("optim.backbone_lr_scale=-1", "optim.backbone_lr_scale=-1.0 is invalid"),
])
def test_bad_optim_values_fail_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(overrides=[override])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["finetune_cifar10", "finetune_digits", "finetune_384"])
def test_finetune_configs_load(name):
    config = load_config(f"jobs/configs/{name}.yaml")
    if name != "finetune_384":  # the paper's transfer recipe
        assert config.optim.optimizer == "sgd" and config.optim.momentum == 0.9
        assert config.optim.backbone_lr_scale == 0.01 and config.optim.weight_decay == 5e-4
    assert config.model.pretrained is None  # given on the command line


def test_deepspeed_takes_sgd_under_zero():
    from t2t_dist.config import EngineConfig
    from t2t_dist.engine import deepspeed_config

    sgd = deepspeed_config(EngineConfig(zero_stage=2), OptimConfig(optimizer="sgd"),
                           global_batch=64, world_size=2)
    adamw = deepspeed_config(EngineConfig(zero_stage=2), OptimConfig(), global_batch=64,
                             world_size=2)
    assert sgd["zero_allow_untested_optimizer"] is True
    assert "zero_allow_untested_optimizer" not in adamw


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_engine_keeps_the_backbone_scale_per_step(zero_stage, process_group):
    """Through DeepSpeed's ZeRO wrappers: the groups keep ``lr_scale`` and set_lr scales them."""
    from t2t_dist.engine import build_engine

    config = load_config(overrides=["model.name=t2t_vit_tiny", "model.img_size=32",
                                    "model.num_classes=5", "model.compile=false",
                                    "data.global_batch=4", "optim.optimizer=sgd",
                                    "optim.backbone_lr_scale=0.01", "engine.precision=bf16",
                                    f"engine.zero_stage={zero_stage}"])
    torch.manual_seed(0)
    engine = build_engine(create_model("t2t_vit_tiny", img_size=32, num_classes=5), config,
                          world_size=1, device=torch.device("cpu"))
    set_lr(engine, 0.05)
    rates = sorted({round(g["lr"], 12) for g in engine.optimizer.param_groups})
    assert rates == [0.0005, 0.05]
    loss = engine(torch.randn(4, 3, 32, 32, dtype=torch.bfloat16)).float().logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()  # SGD runs under ZeRO
    assert sorted({round(g["lr"], 12) for g in engine.optimizer.param_groups}) == [0.0005, 0.05]
