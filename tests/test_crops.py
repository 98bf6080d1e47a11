"""The random crop and flip of a training sample: a function of (data.seed, epoch, position).

So a sample's crop is the same whatever the number of DataLoader workers, ranks or the batch
size, and after a resume; and it changes with the epoch. Every sample of the toy set is its
own class, so a label names the sample its image came from.
"""

from __future__ import annotations

import pytest
import torch

from t2t_dist.config import DataConfig
from t2t_dist.data import (build_train_loader, build_val_loader, manifest_pattern,
                            write_shards)

IMG = 16


def _shards(image_tree, tmp_path, num_samples: int, samples_per_shard: int) -> str:
    out = tmp_path / f"shards-{samples_per_shard}"
    manifest = write_shards(image_tree(num_samples), out, prefix="crops",
                            samples_per_shard=samples_per_shard, processes=1)
    return manifest_pattern(str(out), manifest)


def _config(pattern: str, **changes) -> DataConfig:
    # Wide crop scales and a fair coin for the flip: two draws almost never give the same image.
    return DataConfig(**{"train_urls": pattern, "val_urls": pattern, "shard_interleave": 3,
                         "crop_scale": (0.08, 1.0), "hflip": 0.5, "loader_workers": 0, **changes})


def _images_by_sample(config: DataConfig, *, epoch: int, world_size: int = 1, micro_batch: int = 4,
                      state: dict | None = None) -> tuple[dict[int, torch.Tensor], list[int]]:
    """{label: uint8 image} of one epoch over all ranks, and the labels in rank 0's order."""
    images, order = {}, []
    for rank in range(world_size):
        loader = build_train_loader(config, img_size=IMG, rank=rank, world_size=world_size,
                                    micro_batch=micro_batch)
        if state is not None:
            loader.load_state_dict(state)
        loader.set_epoch(epoch)
        for batch, labels in loader:
            for image, label in zip(batch, labels.tolist()):
                assert label not in images, f"sample {label} delivered twice"
                images[label] = image.clone()
                if rank == 0:
                    order.append(label)
    return images, order


def test_crop_does_not_depend_on_workers_ranks_or_batch(image_tree, tmp_path):
    pattern = _shards(image_tree, tmp_path, 48, samples_per_shard=10)
    reference, _ = _images_by_sample(_config(pattern), epoch=2)
    assert sorted(reference) == list(range(48))
    for changes, world_size, micro_batch in [({"loader_workers": 2}, 1, 4),
                                             ({"loader_workers": 2}, 2, 4),
                                             ({}, 3, 4),
                                             ({"loader_workers": 2}, 2, 8)]:
        got, _ = _images_by_sample(_config(pattern, **changes), epoch=2, world_size=world_size,
                                   micro_batch=micro_batch)
        assert got.keys() == reference.keys()
        differ = [label for label in reference if not torch.equal(got[label], reference[label])]
        assert not differ, (f"workers={changes.get('loader_workers', 0)} world={world_size} "
                            f"batch={micro_batch}: other crops for samples {differ}")


def test_resume_gives_the_same_crops(image_tree, tmp_path):
    config = _config(_shards(image_tree, tmp_path, 48, samples_per_shard=10))
    reference, _ = _images_by_sample(config, epoch=1)
    loader = build_train_loader(config, img_size=IMG, rank=0, world_size=2, micro_batch=4)
    loader.set_epoch(1)
    for step, _batch in enumerate(loader):
        if step == 2:  # 3 batches on each of 2 ranks: 24 samples consumed
            break
    state = loader.state_dict()
    assert state["position"] == 24
    # The rest on one rank with batch 8 (another split of the same positions), workers 2.
    rest, _ = _images_by_sample(_config(config.train_urls, loader_workers=2), epoch=1,
                                micro_batch=8, state=state)
    assert len(rest) == 24
    differ = [label for label in rest if not torch.equal(rest[label], reference[label])]
    assert not differ, f"other crops after the resume for samples {differ}"


def test_crops_change_with_the_epoch(image_tree, tmp_path):
    # One shard: the sample order is the stored order in every epoch, so each position holds
    # the same sample and only the epoch can change its crop.
    config = _config(_shards(image_tree, tmp_path, 24, samples_per_shard=24))
    first, order = _images_by_sample(config, epoch=0)
    again, order_again = _images_by_sample(config, epoch=0)
    second, order_second = _images_by_sample(config, epoch=1)
    assert order == order_again == order_second
    assert all(torch.equal(first[label], again[label]) for label in first)  # deterministic
    same = [label for label in first if torch.equal(first[label], second[label])]
    assert not same, f"samples {same} got the same crop in epochs 0 and 1"
    # Each sample is flipped in some epochs and not in others; over 8 epochs a fair coin
    # leaves a sample unflipped throughout with probability 1/256: seen on nearly every sample.
    flipped = {label: 0 for label in first}
    plain = _config(config.train_urls, hflip=0.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    mirror = _config(config.train_urls, hflip=1.0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    unflipped, _ = _images_by_sample(plain, epoch=0)
    mirrored, _ = _images_by_sample(mirror, epoch=0)
    assert all(torch.equal(mirrored[label], unflipped[label].flip(-1)) for label in unflipped)
    fixed_crop = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}
    for epoch in range(8):
        images, _ = _images_by_sample(_config(config.train_urls, **fixed_crop), epoch=epoch)
        for label, image in images.items():
            if torch.equal(image, mirrored[label]) and not torch.equal(image, unflipped[label]):
                flipped[label] += 1
            else:
                assert torch.equal(image, unflipped[label]), f"sample {label}: neither crop"
    assert sum(0 < count < 8 for count in flipped.values()) >= len(flipped) - 1
    assert sum(flipped.values()) == pytest.approx(8 * len(flipped) / 2, rel=0.25)


def test_evaluation_crop_is_fixed(image_tree, tmp_path):
    """Resize + center crop: the same image for a sample on any world size, worker count or
    epoch, never a training crop, and every real sample present (padding only past the end)."""
    config = _config(_shards(image_tree, tmp_path, 20, samples_per_shard=6), eval_batch=3)

    def val_images(world_size, epoch, **changes):
        images = {}
        for rank in range(world_size):
            loader = build_val_loader(_config(config.train_urls, eval_batch=3, **changes),
                                      img_size=IMG, rank=rank, world_size=world_size)
            loader.set_epoch(epoch)
            for batch, labels in loader:
                for image, label in zip(batch, labels.tolist()):
                    if label >= 0:
                        images[label] = image.clone()
                    else:
                        assert not image.any()  # padding is a black image
        return images

    reference = val_images(1, 0)
    assert sorted(reference) == list(range(20))
    for world_size, epoch, changes in [(3, 0, {"loader_workers": 2}), (2, 5, {})]:
        got = val_images(world_size, epoch, **changes)
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[label], reference[label]) for label in reference)
    train, _ = _images_by_sample(config, epoch=0)
    assert sum(torch.equal(train[label], reference[label]) for label in reference) <= 1
