"""Which rank gets which batch: global batch ``j`` (positions ``[start + j*B, start + (j+1)*B)``
of the epoch order) goes to rank ``j % world_size``, as its local batch ``j // world_size``.

The one-rank loader is the reference for the epoch order (with one rank, global batch j is
its batch j); every sample of the toy set is its own class, so labels name samples.
"""

from __future__ import annotations

import pytest

from t2t_dist.config import DataConfig
from t2t_dist.data import build_train_loader, manifest_pattern, write_shards

IMG = 8


@pytest.fixture
def config(image_tree, tmp_path) -> DataConfig:
    """96 samples in uneven shards of 10, merged in groups of 3."""
    manifest = write_shards(image_tree(96), tmp_path / "out", prefix="split",
                            samples_per_shard=10, processes=1)
    pattern = manifest_pattern(str(tmp_path / "out"), manifest)
    return DataConfig(train_urls=pattern, val_urls=pattern, shard_interleave=3, loader_workers=0)


def _batches(config: DataConfig, *, rank: int, world_size: int, micro_batch: int = 4,
             epoch: int = 1, state: dict | None = None, **changes) -> list[list[int]]:
    loader = build_train_loader(DataConfig(**{**config.__dict__, **changes}), img_size=IMG,
                                rank=rank, world_size=world_size, micro_batch=micro_batch)
    if state is not None:
        loader.load_state_dict(state)
    loader.set_epoch(epoch)
    return [labels.tolist() for _, labels in loader]


@pytest.mark.parametrize("world_size, workers", [(2, 0), (3, 0), (3, 2), (4, 1)])
def test_global_batch_j_goes_to_rank_j_mod_world(config, world_size, workers):
    reference = _batches(config, rank=0, world_size=1)  # global batches 0 .. 23
    assert len(reference) == 96 // 4
    per_rank = 96 // (4 * world_size)  # the last partial global step is dropped
    for rank in range(world_size):
        got = _batches(config, rank=rank, world_size=world_size, loader_workers=workers)
        assert got == reference[rank::world_size][:per_rank], f"rank {rank} of {world_size}"


def test_resume_on_another_world_size_continues_the_assignment(config):
    """After 40 positions (5 steps of 2 ranks x 4), 3 ranks continue at global batch 10."""
    reference = _batches(config, rank=0, world_size=1)
    loader = build_train_loader(config, img_size=IMG, rank=0, world_size=2, micro_batch=4)
    loader.set_epoch(1)
    for step, _batch in enumerate(loader):
        if step == 4:
            break
    state = loader.state_dict()
    assert state["position"] == 5 * 2 * 4
    rest = reference[10:]  # global batches from position 40 on, in batches of 4
    for rank in range(3):
        got = _batches(config, rank=rank, world_size=3, state=state)
        assert got == rest[rank::3][:(96 - 40) // 12], f"rank {rank} of 3 after the resume"
