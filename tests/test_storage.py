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
    """A TCP proxy to the S3 server that cuts the first ``drops`` responses (None: every one)
    after ``drop_after`` bytes (None: right after the headers, before any body byte); with
    ``then_refuse``, it then stops listening."""

    def __init__(self, upstream_port: int, drop_after: int | None, *, drops: int | None = 1,
                 then_refuse: bool = False):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream_port, self.drop_after, self.dropped = upstream_port, drop_after, 0
        self.drops, self.then_refuse = drops, then_refuse
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop listening (shutdown wakes the thread blocked in accept, so the port closes)."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

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
                cutting = response and (self.drops is None or self.dropped < self.drops)
                cut = self.drop_after - sent if self.drop_after is not None else (
                    data.find(b"\r\n\r\n") + 4 if b"\r\n\r\n" in data else len(data) + 1)
                if cutting and cut <= len(data):
                    sink.sendall(data[:cut])
                    self.dropped += 1
                    if self.then_refuse and self.dropped == self.drops:
                        self.close()  # new connections are refused from now on
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
        resumes = stream.raw.resumes
    assert proxy.dropped == 1 and resumes >= 1  # the connection really broke mid-body
    assert got == payload[1000:]  # ... and no byte was lost or repeated
    proxy.close()


def _get_object_calls(store: S3Store) -> list[dict]:
    """Every GetObject request the store's client sends from now on, retries included."""
    calls: list[dict] = []
    store.client.meta.events.register("before-send.s3.GetObject", lambda **kw: calls.append(kw))
    return calls


RETRIES, RESUMES = 2, 3  # botocore attempts per call: RETRIES + 1


@pytest.mark.s3
def test_s3_stopped_server_costs_botocore_attempts_only(s3_bucket, s3_server):
    from botocore.exceptions import EndpointConnectionError

    open_store(s3_bucket).put("blob.bin", os.urandom(1000))
    s3_server.stop()
    try:
        store = S3Store(s3_bucket[len("s3://"):], retries=RETRIES, resumes=RESUMES)
        calls = _get_object_calls(store)  # a fresh client: no pooled connection to the old server
        with pytest.raises(EndpointConnectionError):
            store.get("blob.bin")
    finally:
        s3_server.start()
    # botocore retried the call; we did not retry it again (before: attempts x our retries).
    assert len(calls) == RETRIES + 1


@pytest.mark.s3
@pytest.mark.parametrize("case", ["no_body_byte_ever", "cut_then_server_gone"])
def test_s3_read_attempts_add_up_not_multiply(case, s3_bucket, s3_server, monkeypatch):
    open_store(s3_bucket).put("blob.bin", os.urandom(1024 * 1024))
    if case == "no_body_byte_ever":
        proxy = _DroppingProxy(s3_server.port, drop_after=None, drops=None)
    else:
        proxy = _DroppingProxy(s3_server.port, drop_after=256 * 1024, drops=1, then_refuse=True)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    store = S3Store(s3_bucket[len("s3://"):], retries=RETRIES, resumes=RESUMES)
    calls = _get_object_calls(store)
    with pytest.raises(Exception) as error:
        with store.open_read("blob.bin") as stream:
            stream.read()
    if case == "no_body_byte_ever":  # every resumed body breaks before a byte: RESUMES, then give up
        assert type(error.value).__name__ in {"ResponseStreamingError", "IncompleteReadError"}
        assert proxy.dropped == RESUMES + 1 and len(calls) == 1 + RESUMES
    else:  # one resume, whose GetObject botocore retries against a closed port, then gives up
        assert type(error.value).__name__ == "EndpointConnectionError"
        assert proxy.dropped == 1 and len(calls) == 1 + RETRIES + 1
    assert len(calls) <= (RETRIES + 1) + RESUMES  # the sum of the two budgets, not the product
    proxy.close()


@pytest.mark.s3
def test_s3_resume_budget_is_per_stall_not_per_read(s3_bucket, s3_server, monkeypatch):
    """A body cut every 200 KB: more cuts than RESUMES, but each resume made progress."""
    payload = os.urandom(1024 * 1024)
    open_store(s3_bucket).put("blob.bin", payload)
    proxy = _DroppingProxy(s3_server.port, drop_after=200 * 1024, drops=None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    store = S3Store(s3_bucket[len("s3://"):], retries=RETRIES, resumes=RESUMES)
    calls = _get_object_calls(store)
    with store.open_read("blob.bin", 10) as stream:
        assert stream.read() == payload[10:]
        resumes = stream.raw.resumes
    assert proxy.dropped > RESUMES and resumes == proxy.dropped and len(calls) == resumes + 1
    ranges = [kw["request"].headers["Range"] for kw in calls]
    assert ranges[0] == b"bytes=10-" and len(set(ranges)) == len(ranges)  # each from further on
    proxy.close()
