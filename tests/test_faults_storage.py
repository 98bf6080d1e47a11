"""Object storage unreachable at start: one line naming the endpoint, before Ray is touched.

``AWS_ENDPOINT_URL`` points at a port nothing listens on (bound, then closed), for the shards
and for the run's storage folder in turn; the job's ``main`` runs in this process.
"""

from __future__ import annotations

import contextlib
import io
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import pretrain  # noqa: E402  (jobs/pretrain.py)


@pytest.fixture
def closed_endpoint(monkeypatch) -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    return endpoint


@pytest.mark.parametrize("where", ["shards", "run storage"])
def test_unreachable_object_storage_is_one_line_naming_the_endpoint(closed_endpoint, where,
                                                                    digits_shards, tmp_path,
                                                                    monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    if where == "shards":
        argv = ["--set", "data.train_urls=s3://bucket/train/t-{0000..0003}.tar",
                "--set", "data.val_urls=s3://bucket/val/v-{0000..0001}.tar",
                "--set", f"run.storage_path={tmp_path}/runs"]
        field = "data.train_urls='s3://bucket/train/t-{0000..0003}.tar' cannot be read"
    else:
        argv = ["--set", f"data.train_urls={digits_shards['train']}",
                "--set", f"data.val_urls={digits_shards['val']}",
                "--set", "run.storage_path=s3://bucket/runs"]
        field = "run.storage_path='s3://bucket/runs' cannot be read"
    initialized = ray.is_initialized()
    err = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stderr(err):
        code = pretrain.main(argv)
    seconds = time.perf_counter() - started
    lines = err.getvalue().splitlines()
    assert code == 2 and len(lines) == 1, err.getvalue()[-2000:]
    assert lines[0].startswith(f"pretrain: error: {field}: EndpointConnectionError")
    assert closed_endpoint in lines[0] and "AWS_ENDPOINT_URL" in lines[0]
    assert ray.is_initialized() == initialized and not (tmp_path / "runs").exists()
    assert seconds < 60  # botocore's retries are bounded (data.io_retries)
