"""A torn or corrupt checkpoint is detected, skipped with a one-line warning, and the previous
one of the run is used (one-process gloo group, real DeepSpeed engine, real Ray Checkpoints)."""

import pytest
import torch
from pyarrow.fs import LocalFileSystem
from ray.train import Checkpoint

from t2t_dist.checkpoint import (Checkpointer, Replicated, SampleLedger, checkpoint_folder_name,
                                 checkpoint_name, checkpoint_step, client_path, missing_parts,
                                 run_checkpoints)
from t2t_dist.config import load_config
from t2t_dist.data import BatchAugment, build_train_loader
from t2t_dist.engine import build_engine
from t2t_dist.loop import next_micro_batches, train_step
from t2t_dist.models import create_model
from t2t_dist.optim import WeightEma

DEVICE = torch.device("cpu")


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def drop_rank(directory):
    """Rank 0's marker says two ranks wrote this checkpoint; rank 1's part never arrived."""
    state = torch.load(client_path(directory, 0), weights_only=False)
    torch.save({**state, "world_size": 2}, client_path(directory, 0))


def garble(path):
    path.write_bytes(b"not a checkpoint" * 10)


def optimizer_shard(directory):
    return next((directory / "state").glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt"))


def three_checkpoints(digits_shards, run):
    """A tiny ZeRO-2 engine trained 3 steps, checkpointed after each into ``run``; returns the
    checkpointer, the loader, the sample ledger, the engine and each step's weights."""
    config = load_config(overrides=[
        f"data.train_urls={digits_shards['train']}", f"data.val_urls={digits_shards['val']}",
        "model.name=t2t_vit_tiny", "model.compile=false", "model.img_size=32",
        "data.global_batch=8", "data.loader_workers=0", "engine.precision=fp32",
        "engine.zero_stage=2"])
    torch.manual_seed(0)
    loader = build_train_loader(config.data, img_size=32, micro_batch=8)
    engine = build_engine(create_model("t2t_vit_tiny", img_size=32, num_classes=10), config,
                          world_size=1, device=DEVICE)
    ema = WeightEma(engine.module.state_dict(), decay=0.9)
    ledger = SampleLedger()
    checkpointer = Checkpointer(engine, {"loader": loader, "samples_seen": ledger,
                                         "ema": Replicated(ema)})
    augment = BatchAugment(config.data, 10)
    loader.set_epoch(0)
    batches = iter(loader)
    weights = {}
    for step in (1, 2, 3):
        micro_batches = next_micro_batches(batches, 1)
        ledger.add(0, micro_batches)
        train_step(engine, micro_batches, augment=augment, lr=1e-3, device=DEVICE, dtype=torch.float32)
        checkpointer.save(run / f"checkpoint_step_{step:08d}", step=step, epoch=0)
        weights[step] = {k: v.clone() for k, v in engine.module.state_dict().items()}
    return checkpointer, loader, ledger, engine, weights


@pytest.mark.slow
@pytest.mark.parametrize("damage, reason", [
    (lambda d: truncate(optimizer_shard(d)), "bytes, expected"),
    (lambda d: truncate(d / "state" / "mp_rank_00_model_states.pt"), "bytes, expected"),
    (drop_rank, "rank 1's part is missing"),
    (lambda d: garble(client_path(d, 0)), "rank 0's part is missing or unreadable"),
    (lambda d: (d / "ema.pt").unlink(), "ema.pt (rank 0) is missing"),
])
def test_torn_checkpoint_falls_back_to_the_previous(process_group, digits_shards, tmp_path,
                                                    capfd, damage, reason):
    run = tmp_path / "run"
    checkpointer, loader, ledger, engine, weights = three_checkpoints(digits_shards, run)
    assert missing_parts(run / "checkpoint_step_00000003") == ""

    damage(run / "checkpoint_step_00000003")
    assert reason in missing_parts(run / "checkpoint_step_00000003")
    capfd.readouterr()
    client = checkpointer.restore(Checkpoint.from_directory(str(run / "checkpoint_step_00000003")))
    warning = [line for line in capfd.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "checkpoint_step_00000003" in warning[0] and reason in warning[0]
    assert warning[0].endswith("trying the previous one")
    assert client["step"] == 2 and loader.state_dict()["position"] == 16
    assert ledger.count(0) == 16  # the samples of steps 1-2, none of step 3
    for name, tensor in engine.module.state_dict().items():
        torch.testing.assert_close(tensor, weights[2][name], rtol=0, atol=0)
    # Step 3 again goes to another folder: Ray Train may hold the torn one registered.
    published = []
    checkpointer.publish = lambda metrics, directory, name: published.append(name)
    checkpointer.commit(step=3, epoch=0, metrics={})
    assert published == ["checkpoint_step_00000003.1"]

    # Every checkpoint of the run torn: a clear error, never a silent fresh start.
    truncate(optimizer_shard(run / "checkpoint_step_00000002"))
    drop_rank(run / "checkpoint_step_00000001")
    with pytest.raises(RuntimeError, match=r"no usable checkpoint: .*checkpoint_step_00000003, "
                                           r".*checkpoint_step_00000002, .*checkpoint_step_00000001"):
        checkpointer.restore(Checkpoint.from_directory(str(run / "checkpoint_step_00000003")))


@pytest.mark.slow
def test_the_newest_complete_checkpoint_in_storage_wins_over_the_registered_one(
        process_group, digits_shards, tmp_path, capfd):
    """The driver ended after every rank completed step 2's checkpoint but before Ray Train
    registered it (its latest: step 1), and during step 3's save (rank 1's part never came):
    the run resumes at step 2, names step 3 as passed over and why, and says why step 2."""
    run = tmp_path / "run"
    checkpointer, loader, _, engine, weights = three_checkpoints(digits_shards, run)
    drop_rank(run / "checkpoint_step_00000003")
    registered = Checkpoint.from_directory(str(run / "checkpoint_step_00000001"))
    filesystem = LocalFileSystem()  # as Ray Train's storage hands it to the workers
    stored = run_checkpoints(str(run), filesystem,
                             lambda path: Checkpoint(path, filesystem=filesystem))
    assert [checkpoint_name(c) for c in stored] == [
        "checkpoint_step_00000003", "checkpoint_step_00000002", "checkpoint_step_00000001"]
    assert "rank 1's part is missing" in missing_parts(stored[0].path, filesystem)
    assert missing_parts(stored[1].path, filesystem) == ""

    capfd.readouterr()
    client = checkpointer.restore(registered, stored)
    out, err = capfd.readouterr()
    assert client["step"] == 2 and loader.state_dict()["position"] == 16
    for name, tensor in engine.module.state_dict().items():
        torch.testing.assert_close(tensor, weights[2][name], rtol=0, atol=0)
    [passed_over] = [line for line in err.splitlines() if "WARNING" in line]
    assert "checkpoint_step_00000003" in passed_over and "rank 1's part is missing" in passed_over
    [resumed] = [line for line in out.splitlines() if "resuming from" in line]
    assert "checkpoint_step_00000002: every rank completed it, though Ray Train had registered " \
           "checkpoint_step_00000001" in resumed


def test_checkpoint_folder_names_sort_by_step_and_avoid_passed_over_ones():
    assert checkpoint_folder_name(120) == "checkpoint_step_00000120"
    taken = {"checkpoint_step_00000120", "checkpoint_step_00000120.1"}
    assert checkpoint_folder_name(120, taken) == "checkpoint_step_00000120.2"
    assert checkpoint_folder_name(125, taken) == "checkpoint_step_00000125"
    names = ["checkpoint_step_00000125", "checkpoint_step_00000120.2", "checkpoint_step_00000115",
             "checkpoint_step_00000120", "checkpoint_step_00001000"]
    assert [checkpoint_step(name) for name in sorted(names)] == [115, 120, 120, 125, 1000]
