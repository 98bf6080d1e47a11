"""The store interface on a local folder and on a real S3-compatible server (moto, HTTP)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from t2t_dist.storage import LocalStore, S3Store, open_store, split_url


def _exercise(store) -> None:
    store.put("a/x.bin", b"hello world")
    store.put("a/y.bin", memoryview(b"12345"))
    store.put("b.bin", b"")
    assert store.get("a/x.bin") == b"hello world"
    assert store.list() == ["a/x.bin", "a/y.bin", "b.bin"]
    assert store.list("a/") == ["a/x.bin", "a/y.bin"]
    with store.open_read("a/x.bin", 6) as stream:
        assert stream.read() == b"world"
    with store.open_read("a/x.bin", 2, 5) as stream:
        assert stream.read() == b"llo"
    with pytest.raises(FileNotFoundError):
        store.get("nope.bin")
    store.delete("a")
    assert store.list() == ["b.bin"]


def test_local_store(tmp_path):
    store = open_store(tmp_path / "root")
    assert isinstance(store, LocalStore)
    _exercise(store)
    assert open_store(f"file://{tmp_path}").root == tmp_path
    with pytest.raises(ValueError, match="expected s3://bucket/prefix"):
        open_store("gs://bucket/x")


@pytest.mark.s3
def test_s3_store_and_multipart_upload(s3_bucket, tmp_path):
    store = open_store(s3_bucket + "/some/prefix")
    assert isinstance(store, S3Store) and store.url("k") == s3_bucket + "/some/prefix/k"
    _exercise(store)
    big = os.urandom(9 * 1024 * 1024)  # above boto3's 8 MiB multipart threshold
    path = tmp_path / "big.bin"
    path.write_bytes(big)
    store.put("big.bin", path)
    assert store.get("big.bin") == big
    parent, name = split_url(s3_bucket + "/some/prefix/big.bin")
    assert name == "big.bin" and parent.list() == ["b.bin", "big.bin"]
    assert parent.get(name) == big


class _DroppingProxy:
    """A TCP proxy to the S3 server that cuts the first response carrying ``drop_after`` bytes."""

    def __init__(self, upstream_port: int, drop_after: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream_port, self.drop_after, self.dropped = upstream_port, drop_after, 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, response: bool) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if response and self.dropped == 0 and sent + len(data) > self.drop_after:
                    sink.sendall(data[: self.drop_after - sent])
                    self.dropped += 1
                    break  # mid-body: close both ends
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()


@pytest.mark.s3
def test_s3_read_resumes_after_connection_drop(s3_bucket, s3_server, monkeypatch):
    payload = os.urandom(3 * 1024 * 1024)
    open_store(s3_bucket).put("blob.bin", payload)
    proxy = _DroppingProxy(s3_server.port, drop_after=1024 * 1024)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    store = open_store(s3_bucket)
    with store.open_read("blob.bin", 1000) as stream:
        got = stream.read()
        reconnects = stream.raw.reconnects
    assert proxy.dropped == 1 and reconnects >= 1  # the connection really broke mid-body
    assert got == payload[1000:]  # ... and no byte was lost or repeated
    proxy.listener.close()
