"""Object storage behind one small interface, on a local folder or S3 (MinIO, Ceph, moto).

    store = open_store("s3://bucket/runs/exp1")      # or "/mnt/nfs/runs/exp1", "file:///..."
    store.put("ckpt/step-100/model.pt", path_or_bytes_or_file)
    data = store.get("ckpt/step-100/model.pt")
    keys = store.list("ckpt/")                        # keys relative to the store root, sorted
    with store.open_read("shard-0001.tar", start=4096, end=8192) as f: ...

S3 goes through boto3, so the endpoint and credentials come from the standard AWS
environment and config files (``AWS_ENDPOINT_URL`` selects MinIO, Ceph or moto).

Retries, one job each: botocore retries every API call (its "standard" mode: connection
errors, 5xx, throttling; jittered exponential backoff) up to ``retries`` times. Our reader
only resumes a streamed body that breaks mid-read (connection reset, read timeout, short
body): it knows its byte offset and re-issues the ranged GetObject from there, at most
``resumes`` times in a row without a byte received, so the caller sees every byte exactly
once. A GetObject that botocore gave up on is not retried again here, so a dead server
costs ``retries + 1`` attempts, not their product with ours.
A leaf module: it imports nothing from t2t_dist.
"""

from __future__ import annotations

import functools
import http.client
import io
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO, Protocol

API_RETRIES = 8  # botocore retries per API call (attempts = retries + 1)
STREAM_RESUMES = 3  # re-issued ranged GETs after a broken body, in a row without progress


@functools.cache
def _broken_body_errors() -> tuple[type[BaseException], ...]:
    """What reading a GetObject body raises when the connection breaks mid-body."""
    # S3 only (and cached): a local store never loads botocore or urllib3.
    import botocore.exceptions as botocore_errors
    import urllib3.exceptions as urllib3_errors

    return (botocore_errors.ResponseStreamingError,  # urllib3 ProtocolError, wrapped by botocore
            botocore_errors.ReadTimeoutError, botocore_errors.IncompleteReadError,
            botocore_errors.ConnectionError, urllib3_errors.ProtocolError,
            urllib3_errors.ReadTimeoutError, http.client.IncompleteRead, ConnectionError,
            TimeoutError)


def _error_code(error: BaseException) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def backoff_seconds(attempt: int, base: float = 0.2, cap: float = 5.0) -> float:
    """Sleep before resume ``attempt`` (1, 2, ...): 0.2 s doubling up to ``cap``."""
    return min(cap, base * 2 ** (attempt - 1))


class Store(Protocol):
    def put(self, key: str, data: bytes | BinaryIO | Path) -> None: ...
    def get(self, key: str) -> bytes: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def open_read(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO: ...
    def delete(self, key: str) -> None: ...
    def url(self, key: str) -> str: ...


class _LocalRange(io.RawIOBase):
    """Bytes [start, end) of a local file."""

    def __init__(self, path: Path, start: int, end: int | None):
        self._file = open(path, "rb")
        self._file.seek(start)
        self._left = None if end is None else max(0, end - start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        size = len(buffer) if self._left is None else min(len(buffer), self._left)
        data = self._file.read(size)
        buffer[: len(data)] = data
        if self._left is not None:
            self._left -= len(data)
        return len(data)

    def readall(self) -> bytes:
        data = self._file.read(self._left if self._left is not None else -1)
        self._left = 0 if self._left is not None else None
        return data

    def close(self) -> None:
        self._file.close()
        super().close()


class LocalStore:
    """A folder on a local or network file system; keys are relative paths."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def url(self, key: str) -> str:
        return str(self.root / key)

    def put(self, key: str, data: bytes | BinaryIO | Path) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + f".partial-{os.getpid()}")
        if isinstance(data, (bytes, bytearray, memoryview)):
            partial.write_bytes(data)
        elif isinstance(data, Path):
            shutil.copyfile(data, partial)
        else:
            with open(partial, "wb") as out:
                shutil.copyfileobj(data, out, 1 << 20)
        os.replace(partial, path)  # readers never see half a file

    def get(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and ".partial-" not in k)

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        return io.BufferedReader(_LocalRange(self.root / key, start, end), 1 << 20)

    def delete(self, key: str) -> None:
        path = self.root / key
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class _S3Range(io.RawIOBase):
    """Bytes [start, end) of one S3 object that resumes from its offset after a broken body."""

    def __init__(self, store: "S3Store", key: str, start: int, end: int | None):
        self._store, self._key = store, key
        self.position, self._end = start, end
        self._body = None
        self.resumes = 0  # ranged GetObject calls re-issued after the body broke

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        from botocore.exceptions import ClientError  # S3 only

        last = "" if self._end is None else str(self._end - 1)
        try:  # botocore retries transient failures of the call itself
            response = self._store.client.get_object(
                Bucket=self._store.bucket, Key=self._store.full_key(self._key),
                Range=f"bytes={self.position}-{last}")
        except ClientError as error:
            code = _error_code(error)
            if code in {"NoSuchKey", "404", "NoSuchBucket"}:
                raise FileNotFoundError(f"{self._store.url(self._key)} does not exist") from None
            if code in {"InvalidRange", "416"}:  # asked past the end: a truncated object reads as EOF
                self._body = io.BytesIO(b"")
                return
            raise
        self._body = response["Body"]

    def _read_chunk(self, size: int) -> bytes:
        if self._end is not None:
            size = min(size, self._end - self.position)
        if size <= 0:
            return b""
        in_a_row = 0
        while True:
            if self._body is None:
                self._open()
            try:
                data = self._body.read(size)
                break
            except _broken_body_errors():
                in_a_row += 1
                if in_a_row > self._store.resumes:
                    raise
                self._close_body()
                self.resumes += 1
                time.sleep(backoff_seconds(in_a_row))
        self.position += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self._read_chunk(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        # Big reads: botocore/urllib3 cost is per call, and RawIOBase would read 8 KiB at a time.
        chunks = []
        while chunk := self._read_chunk(8 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # a broken connection may fail to close; it is dropped anyway
                pass
        self._body = None

    def close(self) -> None:
        self._close_body()
        super().close()


_SESSION = None  # boto3.session.Session, created on first use


class S3Store:
    """``s3://bucket/prefix``; one boto3 client per process, created on first use."""

    def __init__(self, bucket: str, prefix: str = "", *, retries: int = API_RETRIES,
                 resumes: int = STREAM_RESUMES):
        if not bucket:
            raise ValueError("S3 URL has no bucket: expected s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.retries, self.resumes = retries, resumes
        self._client = None
        self._client_pid = -1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_client_pid": -1}

    @property
    def client(self):
        # A client must not cross fork(): DataLoader and writer processes make their own.
        if self._client is None or self._client_pid != os.getpid():
            import boto3  # ~0.1 s and a session: S3 stores only
            from botocore.config import Config

            global _SESSION
            config = Config(retries={"total_max_attempts": self.retries + 1, "mode": "standard"},
                            connect_timeout=10, read_timeout=60, max_pool_connections=16,
                            response_checksum_validation="when_required")
            # One session per program, inherited by forked workers: it caches the parsed
            # service model, which makes each worker's client ~10x cheaper to create.
            _SESSION = _SESSION or boto3.session.Session()
            self._client = _SESSION.client("s3", config=config)
            self._client_pid = os.getpid()
        return self._client

    def full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.full_key(key)}"

    def put(self, key: str, data: bytes | BinaryIO | Path) -> None:
        """Upload; objects above 8 MiB go up as a multipart upload (boto3's transfer manager)."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            data = io.BytesIO(data)
        if isinstance(data, Path):
            self.client.upload_file(str(data), self.bucket, self.full_key(key))
        else:
            self.client.upload_fileobj(data, self.bucket, self.full_key(key))

    def get(self, key: str) -> bytes:
        with self.open_read(key) as stream:
            return stream.read()

    def list(self, prefix: str = "") -> list[str]:
        root = self.full_key("") if self.prefix else ""
        if root and not root.endswith("/"):
            root += "/"
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + prefix):
            keys.extend(item["Key"][len(root):] for item in page.get("Contents", []))
        return sorted(keys)

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        return io.BufferedReader(_S3Range(self, key, start, end), 1 << 20)

    def delete(self, key: str) -> None:
        """Delete one object, or every object under ``key/``."""
        keys = [self.full_key(key)] + [self.full_key(k) for k in self.list(key.rstrip("/") + "/")]
        for start in range(0, len(keys), 1000):
            self.client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": k} for k in keys[start:start + 1000]], "Quiet": True})


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def open_store(url: str | Path, *, retries: int = API_RETRIES) -> LocalStore | S3Store:
    """The store rooted at ``url``: ``s3://bucket/prefix``, ``file:///path`` or a plain path;
    ``retries``: botocore's retries per S3 API call."""
    url = str(url)
    if is_s3(url):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        return S3Store(bucket, prefix, retries=retries)
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        raise ValueError(f"storage URL {url!r} is not supported: expected s3://bucket/prefix, "
                         f"file:///path or a local path")
    return LocalStore(url)


def split_url(url: str, *, retries: int = API_RETRIES) -> tuple[LocalStore | S3Store, str]:
    """``s3://b/dir/name.tar`` -> (store for ``s3://b/dir``, ``"name.tar"``)."""
    parent, sep, name = str(url).rstrip("/").rpartition("/")
    if not sep:
        parent = "."
    elif not parent or parent.endswith(":/") or parent == "s3:/":
        parent = parent + "/"
    return open_store(parent, retries=retries), name
