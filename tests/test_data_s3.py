"""The loader streaming from a real S3-compatible server (moto) on 127.0.0.1 over HTTP."""

from __future__ import annotations

import collections
import threading
import time

import pytest

from t2t_dist.config import DataConfig
from t2t_dist.data import build_train_loader, manifest_pattern, write_shards
from t2t_dist.storage import open_store

pytestmark = [pytest.mark.s3, pytest.mark.slow]
IMG = 16


@pytest.fixture
def s3_shards(image_tree, s3_bucket):
    """96 one-sample classes in S3 shards of 10 (the last has 6), written by 2 processes."""
    dest = s3_bucket + "/train"
    manifest = write_shards(image_tree(96), dest, prefix="toy-train", samples_per_shard=10,
                            processes=2)
    return manifest_pattern(dest, manifest)


def _config(pattern, **changes):
    return DataConfig(**{"train_urls": pattern, "loader_workers": 2, "shard_interleave": 3,
                         "io_retries": 10, **changes})


def _run(config, rank, *, stop_after=None, epoch=0, state=None, during=None):
    loader = build_train_loader(config, img_size=IMG, rank=rank, world_size=2, micro_batch=4)
    if state is not None:
        loader.load_state_dict(state)
    loader.set_epoch(epoch)
    batches = []
    for step, (_, labels) in enumerate(loader):
        batches.append(labels.tolist())
        if during is not None and step == 0:
            during()
        if stop_after is not None and len(batches) == stop_after:
            break
    return loader, batches


def test_s3_two_ranks_two_workers_exactly_once_and_resume(s3_shards):
    config = _config(s3_shards)
    full = [_run(config, rank, epoch=2)[1] for rank in range(2)]
    assert [len(b) for b in full] == [12, 12]
    assert sorted(x for batches in full for batch in batches for x in batch) == list(range(96))
    for rank in range(2):
        stopped, head = _run(config, rank, epoch=2, stop_after=7)
        _, tail = _run(config, rank, epoch=2, state=stopped.state_dict())
        assert head + tail == full[rank]


def test_s3_bad_data_counted_not_fatal(s3_shards, patch_member):
    import io
    import tarfile

    store = open_store(s3_shards.rsplit("/", 1)[0])
    data = store.get("toy-train-0004.tar")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        name = [n for n in tar.getnames() if n.endswith(".jpg")][1]  # the second sample's jpg
    store.put("toy-train-0004.tar", patch_member(data, name, lambda old: b"\xff" * len(old)))
    store.put("toy-train-0007.tar", store.get("toy-train-0007.tar")[:3000])  # truncated
    store.delete("toy-train-0002.tar")  # missing
    config = _config(s3_shards, max_bad_fraction=0.5)
    skipped, counts = collections.Counter(), []
    for rank in range(2):
        loader, batches = _run(config, rank)
        skipped.update(loader.skipped())
        counts.append(len(batches))
    assert counts == [12, 12]
    assert skipped["corrupt_jpeg"] == 1 and skipped["missing_shard"] == 10
    assert skipped["truncated_tar"] > 0 and skipped["unlabeled"] == 0


def test_s3_server_restart_mid_stream_is_survived(s3_shards, s3_server):
    config = _config(s3_shards)
    expected = [_run(config, rank, epoch=5)[1] for rank in range(2)]

    restart = threading.Timer(2.0, s3_server.start)

    def outage():  # the server goes away after the first batch and comes back 2 s later
        s3_server.stop()
        restart.start()

    started = time.monotonic()
    loader, batches = _run(config, 0, epoch=5, during=outage)
    restart.join(timeout=30)
    assert not restart.is_alive(), "the S3 server did not come back within 30 s"
    assert time.monotonic() - started > 2.0  # the outage really was in the way
    assert batches == expected[0]
    assert sum(loader.skipped().values()) == 0
