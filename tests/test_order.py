"""The epoch order as a pure function: a golden order, the interleave, any window of positions.

The order must not change between versions of the code: a run resumed by a newer version
continues at a global position, which names the remaining samples only if the order is the same.
"""

from __future__ import annotations

import numpy as np
import pytest

from t2t_dist.data.order import EpochOrder

SIZES = np.array([3, 2, 4, 5])

# (shard, sample) of every position, data.seed=7, interleave 2: shards permuted per epoch,
# then each pair of shards merged by a random interleaving, each shard's samples in order.
GOLDEN = {
    0: [(0, 0), (2, 0), (2, 1), (0, 1), (0, 2), (2, 2), (2, 3),
        (3, 0), (3, 1), (3, 2), (1, 0), (3, 3), (1, 1), (3, 4)],
    1: [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2), (2, 3), (0, 2),
        (1, 0), (3, 0), (3, 1), (3, 2), (3, 3), (1, 1), (3, 4)],
}


def _pairs(order: EpochOrder, start: int, stop: int) -> list[tuple[int, int]]:
    shards, samples = order.locate(start, stop)
    assert shards.dtype == samples.dtype == np.int64
    assert shards.shape == samples.shape == (stop - start,)
    return list(zip(shards.tolist(), samples.tolist()))


@pytest.mark.parametrize("epoch", [0, 1])
def test_golden_training_order(epoch):
    order = EpochOrder(SIZES, seed=7, epoch=epoch, shuffle=True, interleave=2)
    assert order.num_samples == 14
    assert _pairs(order, 0, 14) == GOLDEN[epoch]


def test_evaluation_order_is_the_stored_order():
    order = EpochOrder(SIZES, seed=7, epoch=3, shuffle=False, interleave=2)
    assert _pairs(order, 0, 14) == [(s, i) for s, n in enumerate(SIZES.tolist()) for i in range(n)]


@pytest.mark.parametrize("interleave", [1, 3, 5])
def test_each_group_mixes_interleave_shards(interleave):
    sizes = np.full(10, 6)
    order = EpochOrder(sizes, seed=0, epoch=0, shuffle=True, interleave=interleave)
    shards, _ = order.locate(0, order.num_samples)
    for group in range(0, 10, interleave):
        members = min(interleave, 10 - group)
        block = shards[group * 6:(group + members) * 6]
        assert len(set(block.tolist())) == members
        if members > 1:  # merged, not one shard after the other
            assert (np.diff(block) != 0).sum() > members - 1


def test_any_window_is_a_slice_of_the_whole_order():
    """Windows across group boundaries, in any order (the group cache evicts and refills)."""
    sizes = np.array([7, 3, 9, 4, 6, 8, 2, 5, 7, 3, 6])
    order = EpochOrder(sizes, seed=3, epoch=2, shuffle=True, interleave=2)
    whole = _pairs(EpochOrder(sizes, seed=3, epoch=2, shuffle=True, interleave=2), 0,
                   int(sizes.sum()))
    rng = np.random.default_rng(0)
    for _ in range(200):
        start = int(rng.integers(0, order.num_samples + 1))
        stop = int(rng.integers(start, order.num_samples + 1))
        assert _pairs(order, start, stop) == whole[start:stop], (start, stop)


def test_empty_and_out_of_range_windows():
    order = EpochOrder(SIZES, seed=7, epoch=0, shuffle=True, interleave=2)
    for position in (0, 5, 14):  # an empty window anywhere, the end included (eval padding)
        assert _pairs(order, position, position) == []
    for start, stop in ((-1, 3), (3, 15), (5, 4)):
        with pytest.raises(IndexError, match=rf"positions \[{start}, {stop}\) outside the epoch "
                                             rf"of 14"):
            order.locate(start, stop)
