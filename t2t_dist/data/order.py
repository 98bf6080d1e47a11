"""The order of one epoch's samples: a pure function of (seed, epoch) over (shard, sample) positions.

Training order: the shards are permuted by (seed, epoch) and cut into groups of
``interleave`` consecutive shards; inside a group the shards' samples are merged by a
uniformly random interleaving drawn from (seed, epoch, group). Each shard's samples keep
their stored order (already shuffled at write time), so any run of positions maps to one
contiguous sample range per shard -- one Range read each -- while a batch mixes samples of
``interleave`` shards that are grouped differently every epoch.

Evaluation order: shards as listed, samples as stored.

Positions are global (independent of world size and DataLoader workers): global batch
``j`` of size ``B`` is positions ``[start + j*B, start + (j+1)*B)`` and goes to rank
``j % world_size``; so after every rank consumed ``b`` batches, exactly the first
``start + b*B*world_size`` positions are consumed, which is all a resume needs to know.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np


class EpochOrder:
    """Maps positions ``[0, num_samples)`` of one epoch to (shard index, sample index)."""

    def __init__(self, sizes: np.ndarray, *, seed: int, epoch: int, shuffle: bool, interleave: int):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.seed, self.epoch, self.shuffle = seed, epoch, shuffle
        shards = np.arange(len(self.sizes))
        if shuffle:
            shards = np.random.default_rng([seed, epoch, 0]).permutation(shards)
        group = max(1, interleave) if shuffle else 1
        self.groups = [shards[i:i + group] for i in range(0, len(shards), group)]
        group_sizes = [int(self.sizes[g].sum()) for g in self.groups]
        self.group_starts = np.concatenate([[0], np.cumsum(group_sizes)]).astype(np.int64)
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    @property
    def num_samples(self) -> int:
        return int(self.group_starts[-1])

    def _group(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard of each position, sample index within that shard) for one group."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        members = self.groups[index]
        counts = self.sizes[members]
        which = np.repeat(np.arange(len(members)), counts)  # (group size,)
        if self.shuffle and len(members) > 1:
            np.random.default_rng([self.seed, self.epoch, 1, index]).shuffle(which)
        # The k-th occurrence of a shard in the merged sequence is its sample k.
        order = np.argsort(which, kind="stable")
        within = np.empty_like(which)
        within[order] = np.concatenate([np.arange(c) for c in counts]) if len(counts) else []
        result = (members[which], within)
        self._cache[index] = result
        if len(self._cache) > 4:
            self._cache.popitem(last=False)
        return result

    def locate(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, sample) of positions ``start .. stop-1``, each of shape (stop - start,)."""
        if not 0 <= start <= stop <= self.num_samples:
            raise IndexError(f"positions [{start}, {stop}) outside the epoch of {self.num_samples}")
        shards, samples = [], []
        first = int(np.searchsorted(self.group_starts, start, side="right")) - 1
        for index in range(first, len(self.groups)):
            lo = int(self.group_starts[index])
            if lo >= stop:
                break
            group_shards, group_samples = self._group(index)
            a, b = max(start, lo) - lo, min(stop, int(self.group_starts[index + 1])) - lo
            shards.append(group_shards[a:b])
            samples.append(group_samples[a:b])
        if not shards:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(shards), np.concatenate(samples)
