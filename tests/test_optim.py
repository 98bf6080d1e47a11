"""Optimizer arithmetic: no-decay groups, the per-step LR schedule, the EMA and its state."""

import math

import pytest
import torch
from torch import nn

from t2t_dist.config import OptimConfig
from t2t_dist.models import create_model
from t2t_dist.optim import LRSchedule, WeightEma, no_decay_names, param_groups, scaled_lr


class TinyViTLike(nn.Module):
    """The parameter kinds the recipe treats differently, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 8), requires_grad=False)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 24, bias=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}


def test_no_decay_rules_and_frozen_tensors_excluded():
    model = TinyViTLike()
    assert no_decay_names(model) == {"cls_token", "proj.bias", "norm.weight", "norm.bias"}
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.proj.weight), id(model.qkv.weight)}
    grouped = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert id(model.pos_embed) not in grouped  # frozen: never handed to the optimizer
    assert len(grouped) == sum(p.requires_grad for p in model.parameters())


class Nested(nn.Module):
    """Listed names matched by their last component, a 2-D ``*.bias``, a top-level matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.outer = nn.Module()
        self.outer.inner = TinyViTLike()
        self.gate = nn.Module()
        self.gate.bias = nn.Parameter(torch.zeros(2, 2))
        self.mix = nn.Parameter(torch.zeros(3, 3))

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}


def test_no_decay_rules_by_last_name_component_and_suffix():
    assert no_decay_names(Nested()) == {"outer.inner.cls_token", "outer.inner.proj.bias",
                                        "outer.inner.norm.weight", "outer.inner.norm.bias",
                                        "gate.bias"}
    plain = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))  # no no_weight_decay(): rules only
    assert no_decay_names(plain) == {"0.bias", "1.weight", "1.bias"}


def test_no_decay_rules_on_a_real_variant():
    model = create_model("t2t_vit_7", num_classes=10)
    skip = no_decay_names(model)
    assert "cls_token" in skip and "pos_embed" not in skip  # pos_embed is frozen
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        assert (name in skip) == (param.ndim <= 1 or name.endswith(".bias") or name == "cls_token")


def test_linear_lr_scaling():
    assert scaled_lr(5e-4, 1024, 512) == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 64, 512) == pytest.approx(1.25e-4)


def test_schedule_warmup_peak_cosine_cooldown():
    optim = OptimConfig(lr=1e-3, reference_batch=512, epochs=310, warmup_epochs=10,
                        warmup_lr=1e-6, min_lr=1e-5, cooldown_epochs=10)
    schedule = LRSchedule.from_config(optim, global_batch=1024, steps_per_epoch=100)
    peak = 2e-3
    assert (schedule.total_steps, schedule.warmup_steps, schedule.cooldown_steps) == (31000, 1000, 1000)
    assert schedule(0) == pytest.approx(1e-6)  # warmup starts at warmup_lr
    assert schedule(500) == pytest.approx(1e-6 + (peak - 1e-6) / 2)  # linear
    assert schedule(1000) == pytest.approx(peak)  # the peak, first cosine step
    assert schedule(1000 + 14500) == pytest.approx(1e-5 + (peak - 1e-5) / 2)  # cosine midpoint
    assert schedule(1000 + 14500 // 2) == pytest.approx(
        1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi / 4)))
    assert schedule(30000) == pytest.approx(1e-5)  # cosine reached min_lr
    assert schedule(30999) == pytest.approx(1e-5)  # cooldown holds it
    values = [schedule(s) for s in range(0, 31000, 50)]
    top = values.index(max(values))
    assert all(a <= b for a, b in zip(values[:top], values[1:top + 1]))  # rises, then
    assert all(a >= b for a, b in zip(values[top:], values[top + 1:]))  # never rises again


def test_schedule_without_warmup_or_cooldown():
    schedule = LRSchedule(peak_lr=1.0, warmup_lr=0.0, min_lr=0.0, total_steps=10,
                          warmup_steps=0, cooldown_steps=0)
    assert schedule(0) == 1.0 and schedule(5) == pytest.approx(0.5) and schedule(10) == 0.0
    with pytest.raises(ValueError, match="exceed total_steps"):
        LRSchedule(peak_lr=1.0, warmup_lr=0.0, min_lr=0.0, total_steps=10, warmup_steps=6,
                   cooldown_steps=6)


def test_schedule_without_cosine_phase():
    """Warmup straight into cooldown (warmup + cooldown == total) is allowed: peak, then min."""
    schedule = LRSchedule(peak_lr=1.0, warmup_lr=0.5, min_lr=0.1, total_steps=4, warmup_steps=2,
                          cooldown_steps=2)
    assert [schedule(s) for s in range(4)] == pytest.approx([0.5, 0.75, 1.0, 0.1])


def test_ema_follows_the_formula_and_copies_integer_buffers():
    model = TinyViTLike()
    ema = WeightEma(model.state_dict(), decay=0.9)
    with torch.no_grad():
        model.proj.weight.add_(1.0)
        model.steps.fill_(7)
    before = ema.shadow["proj.weight"].clone()
    ema.update(model.state_dict())
    torch.testing.assert_close(ema.shadow["proj.weight"], 0.9 * before + 0.1 * model.proj.weight)
    assert ema.shadow["steps"].item() == 7 and ema.shadow["steps"].dtype == torch.long
    assert ema.shadow["proj.weight"].dtype == torch.float32


def test_ema_keeps_fp32_from_bf16_weights():
    """Steps of (1 - decay) x (weight - shadow) far below bf16's resolution still add up."""
    model = TinyViTLike().to(torch.bfloat16)
    with torch.no_grad():
        model.proj.weight.fill_(1.0)
    ema = WeightEma(model.state_dict(), decay=0.999)
    assert ema.shadow["proj.weight"].dtype == torch.float32
    with torch.no_grad():
        model.proj.weight.fill_(2.0)
    for _ in range(3):
        ema.update(model.state_dict())
    # 2 - 0.999^3 = 1.002997..., while bf16 steps by 1/128 near 1: a bf16 shadow would stay at 1.
    expected = torch.full((8, 8), 2.0 - 0.999 ** 3)
    torch.testing.assert_close(ema.shadow["proj.weight"], expected, rtol=1e-6, atol=0)


def test_ema_takes_name_tensor_pairs_and_its_own_device():
    """The ZeRO-3 path hands ``(name, tensor)`` pairs; the shadow lives where it is told."""
    model = TinyViTLike()
    ema = WeightEma(model.named_parameters(), decay=0.5, device="meta")
    assert set(ema.shadow) == {name for name, _ in model.named_parameters()}
    assert all(t.device.type == "meta" for t in ema.shadow.values())
    on_cpu = WeightEma(iter(model.state_dict().items()), decay=0.5)
    with torch.no_grad():
        model.proj.weight.add_(2.0)
    on_cpu.update(iter(model.state_dict().items()))
    torch.testing.assert_close(on_cpu.shadow["proj.weight"], model.proj.weight - 1.0)


def test_ema_state_round_trip(tmp_path):
    model = TinyViTLike()
    ema = WeightEma(model.state_dict(), decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            model.proj.weight.mul_(1.1).add_(0.01)
        ema.update(model.state_dict())
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    restored = WeightEma(TinyViTLike().state_dict(), decay=0.5)
    restored.load_state_dict(torch.load(tmp_path / "ema.pt"))
    assert restored.decay == 0.99 and restored.updates == 3
    for name, tensor in ema.shadow.items():
        torch.testing.assert_close(restored.shadow[name], tensor, rtol=0, atol=0)
    # The state is a copy: training on does not change what was saved.
    state = ema.state_dict()
    ema.update(model.state_dict())
    assert not torch.equal(state["shadow"]["proj.weight"], ema.shadow["proj.weight"])
    with pytest.raises(KeyError, match="differing keys"):
        WeightEma({"other": torch.zeros(1)}, decay=0.9).load_state_dict(state)
