"""The distributed loader on local shards: exactly once, equal batches, order, resume, bad data.

Every sample of the toy set is its own class, so a label names the sample it came from.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from t2t_dist.config import DataConfig
from t2t_dist.data import DataError, build_train_loader, build_val_loader, manifest_pattern, write_shards
from t2t_dist.data.order import EpochOrder

IMG = 16


@pytest.fixture
def shards(image_tree, tmp_path):
    """96 samples in shards of 10 (the last has 6): uneven on purpose."""
    manifest = write_shards(image_tree(96), tmp_path / "out", prefix="toy-train",
                            samples_per_shard=10, processes=1)
    return manifest_pattern(str(tmp_path / "out"), manifest)


def _config(pattern, **changes) -> DataConfig:
    return DataConfig(**{"train_urls": pattern, "val_urls": pattern, "loader_workers": 2,
                         "eval_batch": 5, "shard_interleave": 3, **changes})


def _epoch(config, *, world_size=2, micro_batch=4, epoch=0, img_size=IMG):
    """Labels per rank per batch for one epoch, and the first rank-0 batch of images."""
    per_rank, first = [], None
    for rank in range(world_size):
        loader = build_train_loader(config, img_size=img_size, rank=rank, world_size=world_size,
                                    micro_batch=micro_batch)
        loader.set_epoch(epoch)
        batches = []
        for images, labels in loader:
            assert images.shape == (micro_batch, 3, img_size, img_size) and str(images.dtype) == "torch.uint8"
            batches.append(labels.tolist())
            first = images if first is None and rank == 0 else first
        assert len(batches) == len(loader)
        per_rank.append(batches)
    return per_rank, first


def test_every_sample_once_equal_batches_2_ranks_2_workers(shards):
    per_rank, _ = _epoch(_config(shards))
    assert [len(b) for b in per_rank] == [12, 12]  # 96 / (2 ranks x 4)
    seen = [label for batches in per_rank for batch in batches for label in batch]
    assert sorted(seen) == list(range(96))


def test_order_is_a_pure_function_of_seed_and_epoch(shards):
    config = _config(shards)
    first, images = _epoch(config, epoch=3)
    again, images_again = _epoch(config, epoch=3)
    assert first == again and (images == images_again).all()  # same crops too
    assert _epoch(config, epoch=4)[0] != first
    assert _epoch(_config(shards, seed=1), epoch=3)[0] != first
    # ... and not of the number of DataLoader workers.
    for workers in (0, 1):
        assert _epoch(_config(shards, loader_workers=workers), epoch=3)[0] == first


def test_uneven_shards_give_equal_batch_counts(image_tree, tmp_path):
    manifest = write_shards(image_tree(53), tmp_path / "u", prefix="u", samples_per_shard=7,
                            processes=1)
    config = _config(manifest_pattern(str(tmp_path / "u"), manifest))
    per_rank, _ = _epoch(config, world_size=3, micro_batch=4)
    assert [len(b) for b in per_rank] == [4, 4, 4]  # 53 // 12; the remainder is dropped
    seen = [label for batches in per_rank for batch in batches for label in batch]
    assert len(seen) == len(set(seen)) == 48


def test_epoch_order_groups_are_contiguous_per_shard():
    order = EpochOrder(np.array([5, 3, 7, 4]), seed=0, epoch=2, shuffle=True, interleave=2)
    shards, samples = order.locate(0, order.num_samples)
    pairs = sorted(zip(shards.tolist(), samples.tolist()))
    assert pairs == [(s, i) for s, n in enumerate([5, 3, 7, 4]) for i in range(n)]
    for shard in range(4):  # each shard's samples keep their stored order
        assert (np.diff(samples[shards == shard]) == 1).all()


def test_resume_gives_exactly_the_remaining_samples(shards):
    config = _config(shards)
    full, _ = _epoch(config, epoch=1)
    states = []
    for rank in range(2):
        loader = build_train_loader(config, img_size=IMG, rank=rank, world_size=2, micro_batch=4)
        loader.set_epoch(1)
        for step, _batch in enumerate(loader):
            if step == 4:  # stop after 5 batches
                break
        states.append(loader.state_dict())
    assert states[0] == states[1] and states[0]["position"] == 5 * 2 * 4
    for rank in range(2):
        restored = build_train_loader(config, img_size=IMG, rank=rank, world_size=2, micro_batch=4)
        restored.load_state_dict(states[rank])
        restored.set_epoch(1)  # the loop's own call: stays inside the restored epoch
        rest = [labels.tolist() for _, labels in restored]
        assert rest == full[rank][5:]
    # Global state: resume the same point on one rank with batch 8 = the same unseen samples.
    single = build_train_loader(config, img_size=IMG, rank=0, world_size=1, micro_batch=8)
    single.load_state_dict(states[0])
    rest = sorted(label for _, labels in single for label in labels.tolist())
    assert rest == sorted(label for r in range(2) for batch in full[r][5:] for label in batch)


def test_val_loader_pads_with_minus_one(shards):
    config = _config(shards, eval_batch=7)
    got = []
    for rank in range(3):
        val = build_val_loader(config, img_size=IMG, rank=rank, world_size=3)
        batches = [labels.tolist() for _, labels in val]
        assert len(batches) == len(val) == 5  # ceil(96 / 21)
        got.extend(label for batch in batches for label in batch)
    assert sorted(label for label in got if label >= 0) == list(range(96))
    assert got.count(-1) == 5 * 21 - 96


def test_bad_data_is_counted_and_replaced(shards, tmp_path, patch_member):
    import tarfile

    out = tmp_path / "out"
    first = out / "toy-train-0000.tar"
    with tarfile.open(first) as tar:
        names = tar.getnames()
    data = patch_member(first.read_bytes(), names[0], lambda old: b"\0" * len(old))  # corrupt jpg
    data = patch_member(data, names[4], lambda old: b"x" * len(old))  # unlabeled
    first.write_bytes(data)
    (out / "toy-train-0003.tar").unlink()  # missing: 10 samples
    fifth = out / "toy-train-0005.tar"
    fifth.write_bytes(fifth.read_bytes()[:4000])  # truncated mid-shard
    config = _config(shards, max_bad_fraction=0.5)
    per_rank, skipped = [], collections.Counter()
    for rank in range(2):
        loader = build_train_loader(config, img_size=IMG, rank=rank, world_size=2, micro_batch=4)
        per_rank.append([labels.tolist() for _, labels in loader])
        skipped.update(loader.skipped())
    assert [len(b) for b in per_rank] == [12, 12]  # bad samples do not change batch counts
    assert skipped["corrupt_jpeg"] == 1 and skipped["unlabeled"] == 1
    assert skipped["missing_shard"] == 10 and skipped["truncated_tar"] > 0
    seen = [label for batches in per_rank for batch in batches for label in batch]
    assert len(seen) == 96 and len(set(seen)) == 96 - sum(skipped.values())


def test_too_many_bad_samples_is_a_clear_error(shards, tmp_path):
    (tmp_path / "out" / "toy-train-0002.tar").unlink()
    loader = build_train_loader(_config(shards, max_bad_fraction=0.05), img_size=IMG, rank=0,
                                world_size=1, micro_batch=4)
    with pytest.raises(DataError, match="max_bad_fraction=0.05"):
        for _ in loader:
            pass


def test_too_few_samples_and_bad_state_are_clear_errors(shards):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_train_loader(_config(shards), img_size=IMG, world_size=4, micro_batch=32)
    loader = build_train_loader(_config(shards), img_size=IMG, micro_batch=4)
    with pytest.raises(ValueError, match="data.seed"):
        loader.load_state_dict({**loader.state_dict(), "seed": 7})
