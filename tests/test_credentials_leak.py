"""Credentials never appear in what a run writes: its output, its storage folder, the MLflow
store (params, tags, metrics, artifacts) and Ray's session logs.

The job runs as a user runs it on a laptop (``python jobs/pretrain.py``, a new local Ray in a
private temp folder), reading its shards from the session's S3 server (moto, HTTP on
127.0.0.1) with ``AWS_SECRET_ACCESS_KEY`` set to a string made for this test; then every
file the run wrote is searched for it (bytes, so binary files count too).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from ray_cluster import DRIVER_ENV

JOB = Path(__file__).resolve().parents[1] / "jobs" / "pretrain.py"


def files_holding(root: Path, secret: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and secret in path.read_bytes():
                found.append(str(path))
        except OSError:  # a socket or a file removed meanwhile
            continue
    return found


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_secret_key_never_written(s3_bucket, tmp_path, monkeypatch):
    import os

    from t2t_dist.data import make_digits_dataset

    shards = make_digits_dataset(f"{s3_bucket}/digits", img_size=32)
    secret = f"t2t-secret-{uuid.uuid4().hex}"
    ray_temp = Path(tempfile.mkdtemp(prefix="t2tc-"))  # short: Ray's socket paths have a limit
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(DRIVER_ENV, AWS_SECRET_ACCESS_KEY=secret, RAY_TMPDIR=str(ray_temp),
               DS_ACCELERATOR="cpu")
    argv = [sys.executable, str(JOB), "--model", "t2t_vit_tiny",
            "--set", f"data.train_urls={shards['train']}", "--set", f"data.val_urls={shards['val']}",
            "--set", "data.global_batch=16", "--set", "optim.reference_batch=16",
            "--set", "scaling.num_workers=1", "--set", "scaling.ray_address=local",
            "--set", "run.max_steps=2", "--set", "run.log_every=1", "--set", "run.log_model=true",
            "--set", "run.name=secret-run", "--set", f"run.storage_path={tmp_path}/runs",
            "--set", f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    try:
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=400)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output.decode(errors="replace")[-3000:]
        assert b"finished secret-run: step 2" in done.stdout
        written = files_holding(tmp_path, secret.encode())  # runs/, mlflow.db, mlartifacts/
        sessions = list(ray_temp.rglob("session_*"))
        assert sessions and any((s / "logs").is_dir() for s in sessions)
        written += files_holding(ray_temp, secret.encode())
        assert secret.encode() not in output
        assert written == [], written
        # The search looks where the run wrote: the shard URL (a param, the saved config) and
        # the worker's own output (Ray's logs) are found the same way.
        assert len(files_holding(tmp_path, shards["train"].encode())) >= 2
        assert files_holding(ray_temp, b"training t2t_vit_tiny for 2 steps")
        assert any(path.name == "model.pth" or path.suffix == ".pkl"
                   for path in (tmp_path / "mlartifacts").rglob("*"))
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
