"""Distributed, resumable loaders over WebDataset shards (local folders or S3).

    train = build_train_loader(data_cfg, img_size=224, rank=0, world_size=1, micro_batch=64)
    train.set_epoch(epoch)
    for images, labels in train:  # uint8 (B, 3, S, S), int64 (B,)
        ...
    state = train.state_dict()    # {"epoch", "position", ...}: global, not per worker

How the work is split (see ``order.py`` for the epoch order): global batch ``j`` is the
``micro_batch`` positions ``[start + j*B, start + (j+1)*B)`` of the epoch order and belongs
to rank ``j % world_size``; a rank's local batch ``i`` is made by DataLoader worker
``i % num_workers``, which is the order in which the DataLoader hands batches back, so the
sample order does not depend on the number of workers. Every rank gets
``num_samples // (world_size * B)`` batches (the last partial global batch is dropped; the
epoch order changes, so it is other samples each epoch). Crops and flips are seeded from
(seed, epoch, position): a restart that loads ``state_dict()`` sees exactly the remaining
samples, with the same crops; ``position`` is global, so a later resume may use another
world size or batch size.

``data.decoder`` picks where JPEGs become pixels: in the DataLoader workers (``pil`` or
``simplejpeg``, the same pixels), or, with ``cuda``, on the training GPU: the workers then
send each batch's JPEG bytes with the crop boxes and flips drawn from the same seeds, and
``ShardLoader`` decodes them with nvJPEG (``transforms.decode_batch_on_device``); samples,
order, crops and resume position are the same with every decoder.

Bad data (corrupt JPEG, truncated tar, missing shard, no label) is counted in
``skipped()``. In training a bad sample's slot is filled by the next good sample of the same
batch (cyclically; with the bad position's own crop), or, if the whole batch is bad, by the
first good samples after it in the epoch order; the batch stays full, so ranks stay in step.
In evaluation a bad sample becomes padding (label -1). Past ``max_bad_fraction`` of this
rank's samples in one epoch, ``DataError``.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from t2t_dist.config.data import DataConfig
from t2t_dist.data.manifest import ShardTable, load_shard_table
from t2t_dist.data.order import EpochOrder
from t2t_dist.data.stream import ShardReader
from t2t_dist.data.tar import sample_image, sample_label
from t2t_dist.data.transforms import (EncodedBatch, check_decoder, decode_batch_on_device,
                                      decode_eval, decode_train, image_size, train_crop)

SKIP_KINDS = ("corrupt_jpeg", "truncated_tar", "missing_shard", "unlabeled")


class DataError(RuntimeError):
    """Too much of the data could not be read."""


@dataclass(frozen=True)
class _Plan:
    """Everything a worker needs to make batches of one epoch (sent to each DataLoader worker)."""

    table: ShardTable
    config: DataConfig
    img_size: int
    train: bool
    rank: int
    world_size: int
    batch: int
    epoch: int
    start: int  # first position of this pass in the epoch order
    num_batches: int  # local batches of this rank in this pass


def _new_batch(shape: tuple[int, ...], *, shared: bool) -> torch.Tensor:
    """Uninitialized uint8 tensor; in a DataLoader worker, allocated straight in shared memory.

    The worker writes the crops into it in place, so the DataLoader queue passes only a file
    descriptor. ``torch.empty(...).share_memory_()`` would allocate twice and copy the whole
    (still empty) batch into the shared segment, ~10 ms per (64, 3, 224, 224) batch; this is
    how ``default_collate`` allocates its output in workers.
    """
    if not shared:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


class _BatchMaker:
    """Turns a rank's local batch index into (images, labels, skip counts)."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.order = EpochOrder(plan.table.sizes, seed=plan.config.seed, epoch=plan.epoch,
                                shuffle=plan.train, interleave=plan.config.shard_interleave)
        self.reader = ShardReader(plan.config.io_retries)
        self.num_classes = len(plan.table.classes)

    def _fetch(self, start: int, stop: int) -> list[tuple[bytes, int] | str]:
        """(image bytes, label) or a failure kind for each position ``start .. stop-1``."""
        shards, samples = self.order.locate(start, stop)
        fetched: dict[tuple[int, int], object] = {}
        for shard in np.unique(shards):
            lo, hi = int(samples[shards == shard].min()), int(samples[shards == shard].max())
            got = self.reader.read(self.plan.table.urls[shard], self.plan.table.offsets[shard], lo, hi)
            fetched.update({(int(shard), lo + k): item for k, item in enumerate(got)})
        out: list[tuple[bytes, int] | str] = []
        for shard, sample in zip(shards.tolist(), samples.tolist()):
            item = fetched[(shard, sample)]
            if isinstance(item, str):
                out.append(item)
                continue
            image, label = sample_image(item), sample_label(item)
            if image is None:
                out.append("corrupt_jpeg")
            elif label is None or not 0 <= label < self.num_classes:
                out.append("unlabeled")
            else:
                out.append((image, label))
        return out

    def _decode(self, image: bytes, position: int):
        """The slot's pixels, uint8 (S, S, 3); with decoder "cuda", what the GPU needs instead:
        (image bytes, crop box or None in evaluation, flip)."""
        plan, config = self.plan, self.plan.config
        if config.decoder == "cuda":
            width, height = image_size(image)  # bytes that are no image fail here, in the worker
            if not plan.train:
                return image, None, False
            rng = np.random.default_rng([config.seed, plan.epoch, position])
            box, flip = train_crop(width, height, scale=config.crop_scale, ratio=config.crop_ratio,
                                   hflip=config.hflip, rng=rng)
            return image, box, flip
        if not plan.train:
            return decode_eval(image, plan.img_size, crop_pct=config.eval_crop_pct,
                               decoder=config.decoder)
        rng = np.random.default_rng([config.seed, plan.epoch, position])
        return decode_train(image, plan.img_size, scale=config.crop_scale, ratio=config.crop_ratio,
                            hflip=config.hflip, rng=rng, decoder=config.decoder)

    def _decode_all(self, items: list, first: int, counts: np.ndarray) -> list:
        """Decode good items in place; a failed decode becomes "corrupt_jpeg"."""
        for k, item in enumerate(items):
            if isinstance(item, str):
                continue
            try:
                items[k] = (item[0], item[1], self._decode(item[0], first + k))
            except Exception:  # PIL raises OSError, SyntaxError, ValueError... on bad bytes
                items[k] = "corrupt_jpeg"
        for item in items:
            if isinstance(item, str):
                counts[SKIP_KINDS.index(item)] += 1
        return items

    def _replacements(self, stop: int) -> list:
        """Good (bytes, label) samples after ``stop`` in the epoch order, for an all-bad batch."""
        total, size = self.order.num_samples, self.plan.batch
        for step in range(0, total, size):
            start = (stop + step) % total
            items = self._fetch(start, min(total, start + size))
            good = [item for item in items if not isinstance(item, str)]
            if good:
                return good
        raise DataError(f"no readable sample in {total} samples of {self.plan.table.urls[0]}...")

    def make(self, index: int) -> tuple:
        """(images uint8 (B, 3, S, S), labels (B,), skip counts); with decoder "cuda",
        (EncodedBatch, labels, skip counts)."""
        plan = self.plan
        size, total = plan.batch, self.order.num_samples
        first = plan.start + (index * plan.world_size + plan.rank) * size
        stop = min(first + size, total)  # eval: positions past the end are padding
        first = min(first, stop)
        counts = np.zeros(len(SKIP_KINDS), dtype=np.int64)
        items = self._decode_all(self._fetch(first, stop), first, counts)
        slots: list = [None] * size  # what each slot shows; None: zeros (eval padding)
        labels = np.full(size, -1, dtype=np.int64)  # eval padding keeps label -1
        good = [item for item in items if not isinstance(item, str)]
        if plan.train and len(good) < len(items):
            donors = [(item[0], item[1]) for item in good] or self._replacements(stop)
        for k, item in enumerate(items):
            if not isinstance(item, str):
                slots[k], labels[k] = item[2], item[1]
            elif plan.train:
                # Next good sample after slot k (cyclically), with slot k's own crop.
                donor = donors[(sum(1 for x in items[:k] if not isinstance(x, str))) % len(donors)]
                try:
                    slots[k] = self._decode(donor[0], first + k)
                except Exception:
                    slots[k] = good[0][2] if good else None
                labels[k] = donor[1]
        if plan.config.decoder == "cuda":
            return EncodedBatch.pack(slots), torch.from_numpy(labels), torch.from_numpy(counts)
        batch = _new_batch((size, 3, plan.img_size, plan.img_size), shared=get_worker_info() is not None)
        images = batch.numpy()
        for k, pixels in enumerate(slots):
            images[k] = 0 if pixels is None else pixels.transpose(2, 0, 1)
        return batch, torch.from_numpy(labels), torch.from_numpy(counts)


def _keep_freed_memory() -> None:
    """In a DataLoader worker: let glibc keep freed memory instead of returning it to the kernel.

    Every sample allocates and frees buffers of 100-200 KB (the range read, JPEG bytes, PIL's
    decode and resize buffers); with glibc's defaults a fresh worker mmaps and unmaps them or
    trims the heap each time, and each page is faulted in again: ~36 page faults per image,
    ~40% of the worker's page faults and ~2% of its CPU. The worker is ours and short-lived,
    so its heap may keep up to 64 MiB. A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: allocations below it come from the heap
    except (AttributeError, OSError):
        pass


class _EpochBatches(IterableDataset):
    def __init__(self, plan: _Plan):
        self.plan = plan

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            _keep_freed_memory()
        maker = _BatchMaker(self.plan)
        for index in range(worker, self.plan.num_batches, workers):
            yield maker.make(index)


class ShardLoader:
    """Iterable of (uint8 images (B, 3, S, S), int64 labels (B,)) for one rank; the images are
    on the GPU with ``data.decoder="cuda"``."""

    def __init__(self, table: ShardTable, config: DataConfig, *, img_size: int, train: bool,
                 rank: int, world_size: int, batch: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is invalid: expected 0 <= rank < world_size({world_size})")
        self.table, self.config, self.img_size, self.train = table, config, img_size, train
        self.rank, self.world_size, self.batch = rank, world_size, batch
        self.num_samples = table.num_samples
        self.num_classes = len(table.classes)
        per_step = world_size * batch
        if train and self.num_samples < per_step:
            raise ValueError(f"{self.num_samples} training samples are fewer than one global batch "
                             f"of {per_step} = world_size({world_size}) x micro_batch({batch})")
        check_decoder(config.decoder)
        self.epoch, self._start, self._done = 0, 0, 0
        self._skipped = np.zeros(len(SKIP_KINDS), dtype=np.int64)

    def __len__(self) -> int:
        """Batches per full epoch for this rank; the same on every rank."""
        return self._batches_from(0)

    def _batches_from(self, start: int) -> int:
        per_step = self.world_size * self.batch
        left = self.num_samples - start
        return left // per_step if self.train else -(-left // per_step)

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of ``epoch``, unless the loader already stands inside it (resume)."""
        if epoch != self.epoch:
            self.epoch, self._start, self._done = epoch, 0, 0
            self._skipped[:] = 0

    def skipped(self) -> dict[str, int]:
        """Samples skipped this epoch on this rank, by kind."""
        return dict(zip(SKIP_KINDS, self._skipped.tolist()))

    @property
    def position(self) -> int:
        """Positions of this epoch's order consumed by all ranks together."""
        return self._start + self._done * self.world_size * self.batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.config.seed,
                "num_samples": self.num_samples, "skipped": self.skipped()}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples or state["seed"] != self.config.seed:
            raise ValueError(f"loader state is for {state['num_samples']} samples with seed "
                             f"{state['seed']}: expected {self.num_samples} samples with seed "
                             f"{self.config.seed} (same shards and data.seed)")
        self.epoch, self._start, self._done = int(state["epoch"]), int(state["position"]), 0
        self._skipped[:] = [state.get("skipped", {}).get(kind, 0) for kind in SKIP_KINDS]

    def _check_bad(self) -> None:
        budget = self.config.max_bad_fraction * len(self) * self.batch
        if self._skipped.sum() > budget:
            found = ", ".join(f"{k}={v}" for k, v in self.skipped().items() if v)
            raise DataError(f"rank {self.rank} skipped {int(self._skipped.sum())} of its "
                            f"{len(self) * self.batch} samples in epoch {self.epoch} ({found}), more "
                            f"than data.max_bad_fraction={self.config.max_bad_fraction}: check the "
                            f"shards with `t2t-dist shards check {self.table.urls[0]}`")

    def __iter__(self):
        """The remaining batches of the current epoch (all of them after ``set_epoch``)."""
        start = self.position
        if not self.train:
            self._start, self._done, self._skipped[:] = 0, 0, 0
            start = 0
        plan = _Plan(self.table, self.config, self.img_size, self.train, self.rank,
                     self.world_size, self.batch, self.epoch, start, self._batches_from(start))
        self._start, self._done = start, 0
        workers = self.config.loader_workers
        loader = DataLoader(_EpochBatches(plan), batch_size=None, num_workers=workers,
                            prefetch_factor=2 if workers else None, persistent_workers=False,
                            pin_memory=torch.cuda.is_available())
        for images, labels, counts in loader:
            if self.config.decoder == "cuda":  # uint8 (B, 3, S, S) on the GPU
                images = decode_batch_on_device(images, self.img_size, train=self.train,
                                                crop_pct=self.config.eval_crop_pct)
            self._done += 1
            self._skipped += counts.numpy()
            self._check_bad()
            yield images, labels


def build_train_loader(config: DataConfig, *, img_size: int, rank: int = 0, world_size: int = 1,
                       micro_batch: int) -> ShardLoader:
    """Training loader of ``config.train_urls`` for one rank: random crops, flips, shuffled order."""
    table = load_shard_table(config.train_urls)
    return ShardLoader(table, config, img_size=img_size, train=True, rank=rank,
                       world_size=world_size, batch=micro_batch)


def build_val_loader(config: DataConfig, *, img_size: int, rank: int = 0,
                     world_size: int = 1) -> ShardLoader:
    """Evaluation loader of ``config.val_urls``: resize + center crop, stored order, padded with
    label -1 so every rank gets the same number of ``config.eval_batch`` batches."""
    table = load_shard_table(config.val_urls)
    return ShardLoader(table, config, img_size=img_size, train=False, rank=rank,
                       world_size=world_size, batch=config.eval_batch)
