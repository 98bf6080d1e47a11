"""One checkpointer: DeepSpeed state + step, RNG and a mapping of stateful parts (data position,
EMA), saved and restored together.

A real DeepSpeed engine (ZeRO-2, fp32, CPU) in a one-process gloo group: train, save, train
on; then a fresh engine loads the checkpoint and must repeat the same losses bit for bit.
"""

import pytest
import torch

from t2t_dist.checkpoint import Checkpointer, Replicated, client_path, missing_parts
from t2t_dist.config import load_config
from t2t_dist.data import BatchAugment, build_train_loader
from t2t_dist.engine import build_engine, consolidated_fp32_state_dict
from t2t_dist.loop import next_micro_batches, train_step
from t2t_dist.models import create_model
from t2t_dist.optim import WeightEma

DEVICE = torch.device("cpu")


def build(digits, seed, stage=2):
    config = load_config(overrides=[
        f"data.train_urls={digits['train']}", f"data.val_urls={digits['val']}",
        "model.name=t2t_vit_tiny", "model.compile=false", "model.img_size=32", "data.global_batch=8",
        "data.loader_workers=0", "engine.precision=fp32", f"engine.zero_stage={stage}",
        "optim.grad_clip=1.0"])
    torch.manual_seed(seed)
    loader = build_train_loader(config.data, img_size=32, micro_batch=8)
    model = create_model("t2t_vit_tiny", img_size=32, num_classes=10, drop_path_rate=0.1)
    ema = WeightEma(model.state_dict(), decay=0.9)
    engine = build_engine(model, config, world_size=1, device=DEVICE)
    augment = BatchAugment(config.data, loader.num_classes)
    return loader, engine, ema, augment


def checkpointer(engine, loader, ema):
    return Checkpointer(engine, {"loader": loader, "ema": Replicated(ema)})


def train(engine, ema, augment, batches, steps):
    losses = []
    for _ in range(steps):
        loss = train_step(engine, next_micro_batches(batches, 1), augment=augment, lr=1e-3,
                          device=DEVICE, dtype=torch.float32)
        ema.update(engine.module.state_dict())
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_resume_repeats_the_same_losses(process_group, digits_shards, tmp_path):
    loader, engine, ema, augment = build(digits_shards, seed=0)
    loader.set_epoch(0)
    batches = iter(loader)
    train(engine, ema, augment, batches, 2)
    checkpointer(engine, loader, ema).save(tmp_path / "ckpt", step=2, epoch=0)
    saved_weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    saved_ema = ema.state_dict()
    expected = train(engine, ema, augment, batches, 3)
    expected_ema = ema.state_dict()

    # A fresh process's view: other initial weights, data at the start, RNG elsewhere.
    loader, engine, ema, augment = build(digits_shards, seed=123)
    torch.manual_seed(999)
    client = checkpointer(engine, loader, ema).load(tmp_path / "ckpt")
    assert (client["step"], client["epoch"], client["world_size"]) == (2, 0, 1)
    assert loader.state_dict()["position"] == 2 * 8
    for name, tensor in engine.module.state_dict().items():
        torch.testing.assert_close(tensor, saved_weights[name], rtol=0, atol=0)
    for name, tensor in ema.shadow.items():
        torch.testing.assert_close(tensor, saved_ema["shadow"][name], rtol=0, atol=0)
    loader.set_epoch(0)  # inside the restored epoch: keeps the position
    got = train(engine, ema, augment, iter(loader), 3)
    assert got == expected  # optimizer moments, data, dropout and augmentation all restored
    for name, tensor in ema.shadow.items():
        torch.testing.assert_close(tensor, expected_ema["shadow"][name], rtol=0, atol=0)


@pytest.mark.slow
def test_checkpoint_layout_and_completeness(process_group, digits_shards, tmp_path):
    loader, engine, ema, augment = build(digits_shards, seed=0)
    loader.set_epoch(0)
    train(engine, ema, augment, iter(loader), 1)
    checkpointer(engine, loader, ema).save(tmp_path / "ckpt", step=1, epoch=0)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "state"
    assert list((tmp_path / "ckpt" / "state").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    assert (tmp_path / "ckpt" / "ema.pt").is_file()
    assert missing_parts(tmp_path / "ckpt") == ""

    # The rank's marker says it wrote for two workers: rank 1's part is missing.
    state = torch.load(client_path(tmp_path / "ckpt", 0), weights_only=False)
    state["world_size"] = 2
    torch.save(state, client_path(tmp_path / "ckpt", 0))
    assert "rank 1" in missing_parts(tmp_path / "ckpt")
    assert "rank 0" in missing_parts(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        checkpointer(engine, loader, ema).load(tmp_path / "empty")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_consolidated_weights_are_full_fp32(process_group, digits_shards, stage):
    loader, engine, ema, augment = build(digits_shards, seed=0, stage=stage)
    loader.set_epoch(0)
    train(engine, ema, augment, iter(loader), 1)
    weights = consolidated_fp32_state_dict(engine)
    reference = create_model("t2t_vit_tiny", img_size=32, num_classes=10).state_dict()
    assert weights.keys() == reference.keys()
    for name, tensor in weights.items():
        assert tensor.shape == reference[name].shape, name  # full, not a ZeRO-3 partition
        assert tensor.dtype == reference[name].dtype
