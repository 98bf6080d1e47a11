"""A real DeepSpeed engine (CPU) in the session's one-process gloo group: the LR the optimizer
steps with is the schedule's at that step, and the exported fp32 weights are the live
model's, value for value, at ZeRO 0, 2 and 3, in bf16, and with optimizer offload.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

from t2t_dist.checkpoint import Checkpointer, SampleLedger
from t2t_dist.config import load_config
from t2t_dist.data import BatchAugment, build_train_loader, build_val_loader
from t2t_dist.engine import build_engine, consolidated_fp32_state_dict, engine_dtype, set_lr
from t2t_dist.loop import TrainParts, fit, steps_per_epoch
from t2t_dist.models import create_model
from t2t_dist.optim import LRSchedule

DEVICE = torch.device("cpu")


def tiny_config(digits, *settings):
    return load_config(overrides=[
        f"data.train_urls={digits['train']}", f"data.val_urls={digits['val']}",
        "model.name=t2t_vit_tiny", "model.compile=false", "model.img_size=32",
        "model.num_classes=10", "data.global_batch=16", "data.eval_batch=150",
        "data.loader_workers=0", "engine.precision=fp32", "optim.ema_decay=0", *settings])


class Tracker:
    def log(self, metrics, step):
        pass

    def log_model(self, model, name="model"):
        pass

    def close(self, status="FINISHED"):
        pass


def test_optimizer_steps_with_the_scheduled_lr(process_group, digits_shards):
    """Recorded inside the torch optimizer's own ``step`` (a step pre-hook), so a no-op
    ``set_lr``, a group left out or the schedule read one step early or late all show."""
    config = tiny_config(digits_shards, "engine.zero_stage=2", "engine.micro_batch=8",
                         "optim.epochs=2", "optim.warmup_epochs=0.1", "optim.cooldown_epochs=0",
                         "run.max_steps=4", "run.log_every=100")
    torch.manual_seed(0)
    train_loader = build_train_loader(config.data, img_size=32, micro_batch=8)
    model = create_model("t2t_vit_tiny", img_size=32, num_classes=10)
    engine = build_engine(model, config, world_size=1, device=DEVICE)
    assert engine.gradient_accumulation_steps() == 2  # two micro batches per optimizer step
    schedule = LRSchedule.from_config(config.optim, global_batch=16,
                                      steps_per_epoch=steps_per_epoch(train_loader, engine))
    assert schedule.warmup_steps == 9  # steps 0..6 all have different LRs
    ledger = SampleLedger()
    parts = TrainParts(engine=engine, train_loader=train_loader, device=DEVICE,
                       val_loader=build_val_loader(config.data, img_size=32),
                       augment=BatchAugment(config.data, 10), schedule=schedule, ledger=ledger,
                       checkpointer=Checkpointer(engine, {"loader": train_loader,
                                                          "samples_seen": ledger},
                                                 publish=lambda metrics, directory, name: None),
                       tracker=Tracker())
    used: dict[int, list[tuple[float, float]]] = {}  # optimizer step -> (lr, lr_scale) per group

    def record(optimizer, args, kwargs):  # ZeRO steps the torch optimizer once per group
        used.setdefault(engine.global_steps, []).extend(
            (group["lr"], group.get("lr_scale", 1.0)) for group in optimizer.param_groups)

    handle = register_optimizer_step_pre_hook(record)
    try:
        fit(config, parts)
        assert sorted(used) == [0, 1, 2, 3]  # one optimizer step per 2 micro batches
        # Resumed at step 4 (the loop's restart path): the schedule goes on from step 4.
        longer = dataclasses.replace(config, run=dataclasses.replace(config.run, max_steps=7))
        fit(longer, parts, resume={"step": 4, "epoch": 0})
    finally:
        handle.remove()
    assert sorted(used) == list(range(7))
    assert len({round(schedule(step), 12) for step in range(7)}) == 7
    for step, groups in used.items():
        assert len(groups) == 2  # decay and no-decay, each stepped once
        for lr, scale in groups:
            assert lr == pytest.approx(schedule(step) * scale, rel=1e-12), f"step {step}"


def live_state(engine) -> dict[str, torch.Tensor]:
    """The module's own full tensors; ZeRO-3 partitions gathered with DeepSpeed's own API."""
    import deepspeed

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {name: t.detach().clone() for name, t in module.state_dict().items()}
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


@pytest.mark.parametrize("stage, precision, offload", [
    (0, "fp32", "none"), (2, "fp32", "none"), (3, "fp32", "none"), (2, "bf16", "none"),
    (3, "bf16", "none"), (2, "fp32", "cpu")])
def test_exported_weights_are_the_live_weights(process_group, digits_shards, stage, precision,
                                                offload):
    config = tiny_config(digits_shards, f"engine.zero_stage={stage}",
                         f"engine.precision={precision}", f"engine.offload_optimizer={offload}")
    torch.manual_seed(0)
    model = create_model("t2t_vit_tiny", img_size=32, num_classes=10)
    initial = {name: t.detach().clone() for name, t in model.state_dict().items()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    engine = build_engine(model, config, world_size=1, device=DEVICE)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        images = torch.randn(16, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 10, (16,), generator=generator)
        set_lr(engine, 1e-2)
        loss = F.cross_entropy(engine(images.to(engine_dtype(engine))).float(), labels)
        engine.backward(loss)
        engine.step()

    exported = consolidated_fp32_state_dict(engine)
    live = live_state(engine)
    assert exported.keys() == live.keys() == initial.keys()
    for name, tensor in exported.items():
        assert tensor.device.type == "cpu" and tensor.shape == initial[name].shape, name
        assert tensor.dtype == (torch.float32 if tensor.is_floating_point() else live[name].dtype)
        # bf16: the module computes with the master weights rounded to bf16.
        assert torch.equal(tensor.to(live[name].dtype), live[name]), f"{name}: not the live one"
        if name in trainable:
            assert not torch.equal(tensor, initial[name].float()), f"{name} did not train"
    if precision == "bf16":  # the fp32 master itself, not the bf16 copy upcast
        assert any(not torch.equal(exported[name], live[name].float()) for name in trainable)
