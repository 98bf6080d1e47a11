"""Byte streams of shards: one Range read fetches a run of samples from a local file or S3.

The manifest records each sample's byte offset, so samples ``lo..hi`` of a shard are the
bytes ``[offsets[lo], offsets[hi + 1])``, parsed by ``tar.parse_tar_samples``. The read goes
through ``t2t_dist.storage``: botocore retries the S3 request, and a body that breaks
mid-read resumes from its byte offset, so a sample is never lost or repeated by a network
error. What cannot be read becomes a per-sample failure kind instead of an exception.
"""

from __future__ import annotations

import tarfile

import numpy as np

from t2t_dist.data.tar import parse_tar_samples
from t2t_dist.storage import LocalStore, S3Store, split_url

MISSING_SHARD = "missing_shard"
TRUNCATED_TAR = "truncated_tar"


class ShardReader:
    """Reads sample ranges; keeps one store (and so one S3 client) per shard folder.
    ``retries``: botocore's retries per S3 request (``data.io_retries``)."""

    def __init__(self, retries: int = 8):
        self.retries = retries
        self._stores: dict[str, LocalStore | S3Store] = {}

    def _open(self, url: str, start: int, end: int):
        directory, _, name = url.rpartition("/")
        if directory not in self._stores:
            self._stores[directory] = split_url(url, retries=self.retries)[0]
        return self._stores[directory].open_read(name, start, end)

    def read(self, url: str, offsets: np.ndarray, lo: int, hi: int) -> list[dict[str, bytes] | str]:
        """Samples ``lo..hi`` (inclusive) of one shard: a field dict each, or a failure kind.

        A shard that does not exist gives ``"missing_shard"`` for each sample; bytes that stop
        short of a sample's end (a truncated tar) give ``"truncated_tar"`` from there on.
        """
        count = hi - lo + 1
        start, end = int(offsets[lo]), int(offsets[hi + 1])
        try:
            with self._open(url, start, end) as stream:
                data = stream.read()
        except FileNotFoundError:
            return [MISSING_SHARD] * count
        # Parse only whole samples: those whose end offset lies inside the bytes we got.
        ends = offsets[lo + 1:hi + 2] - start
        complete = int(np.searchsorted(ends, len(data), side="right"))
        samples: list[dict[str, bytes] | str] = []
        try:
            samples = parse_tar_samples(data[:int(ends[complete - 1])] if complete else b"")
        except (tarfile.TarError, EOFError, ValueError, UnicodeDecodeError):
            pass  # garbage where a header should be: count the whole range as unreadable
        if len(samples) > complete:  # more keys than the manifest says: the offsets do not fit
            samples = samples[:complete]
        return samples + [TRUNCATED_TAR] * (count - len(samples))
