"""Credentials never appear in what a run writes: its output, its storage folder, the MLflow
store (params, tags, metrics, artifacts), the MLflow server's log and Ray's session logs; and
an MLflow server that refuses the job's credentials stops it in one line before Ray starts.

The job runs as a user runs it on a laptop (``python jobs/pretrain.py``, a new local Ray in a
private temp folder), reading its shards from the session's S3 server (moto, HTTP on
127.0.0.1) with ``AWS_SECRET_ACCESS_KEY`` set to a string made for this test, and logging to a
real ``mlflow server --app-name basic-auth`` (as cluster/k8s/mlflow.yaml runs it) as its
training user; then every file the run and the server wrote is searched for the secrets
(bytes, so binary files count too).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from mlflow_auth import (ADMIN, ADMIN_PASSWORD, PASSWORDS, TRAINING, TRAINING_PASSWORD,
                         basic_auth_server, run_script)
from ray_cluster import DRIVER_ENV

JOB = Path(__file__).resolve().parents[1] / "jobs" / "pretrain.py"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """The basic-auth MLflow server with its training user (made by the Job's script)."""
    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (Flask-WTF)")
    with basic_auth_server(tmp_path_factory.mktemp("mlflow-auth")) as server:
        made = run_script(server["uri"], ADMIN, ADMIN_PASSWORD)
        assert made.returncode == 0, made.stderr
        yield server


def job_env(ray_temp: Path, **extra: str) -> dict[str, str]:
    import os

    env = {key: value for key, value in os.environ.items()
           if key != "RAY_ADDRESS" and not key.startswith("MLFLOW_")}
    env.update(DRIVER_ENV, RAY_TMPDIR=str(ray_temp), DS_ACCELERATOR="cpu", **extra)
    return env


@pytest.mark.slow
@pytest.mark.parametrize("user, password", [("", ""), (TRAINING, "wrong-password-for-t2t"),
                                            ("nobody-t2t", TRAINING_PASSWORD)])
def test_refused_credentials_stop_the_job_in_one_line_before_ray(mlflow_server, tmp_path,
                                                                 digits_shards, user, password):
    ray_temp = Path(tempfile.mkdtemp(prefix="t2tc-"))
    credentials = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password} if user else {}
    argv = [sys.executable, str(JOB), "--model", "t2t_vit_tiny",
            "--set", f"data.train_urls={digits_shards['train']}",
            "--set", f"data.val_urls={digits_shards['val']}",
            "--set", f"run.tracking_uri={mlflow_server['uri']}",
            "--set", f"run.storage_path={tmp_path}/runs"]
    try:
        done = subprocess.run(argv, cwd=tmp_path, env=job_env(ray_temp, **credentials),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "(HTTP 401): expected the MLFLOW_TRACKING_USERNAME and " \
            "MLFLOW_TRACKING_PASSWORD of a user of that server" in lines[0], done.stderr
        assert (f"refused user {user!r}" if user else "MLFLOW_TRACKING_USERNAME is unset") in lines[0]
        assert not any(secret in done.stdout + done.stderr for secret in (password or "-", *PASSWORDS))
        assert not list(ray_temp.rglob("session_*"))  # Ray never started
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)


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
def test_secret_key_never_written(s3_bucket, mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from t2t_dist.data import make_digits_dataset
    from t2t_dist.tracking import RUN_NAME_TAG

    shards = make_digits_dataset(f"{s3_bucket}/digits", img_size=32)
    secret = f"t2t-secret-{uuid.uuid4().hex}"
    ray_temp = Path(tempfile.mkdtemp(prefix="t2tc-"))  # short: Ray's socket paths have a limit
    env = job_env(ray_temp, AWS_SECRET_ACCESS_KEY=secret, MLFLOW_TRACKING_USERNAME=TRAINING,
                  MLFLOW_TRACKING_PASSWORD=TRAINING_PASSWORD)
    argv = [sys.executable, str(JOB), "--model", "t2t_vit_tiny",
            "--set", f"data.train_urls={shards['train']}", "--set", f"data.val_urls={shards['val']}",
            "--set", "data.global_batch=16", "--set", "optim.reference_batch=16",
            "--set", "scaling.num_workers=1", "--set", "scaling.ray_address=local",
            "--set", "run.max_steps=2", "--set", "run.log_every=1", "--set", "run.log_model=true",
            "--set", "run.name=secret-run", "--set", f"run.storage_path={tmp_path}/runs",
            "--set", f"run.tracking_uri={mlflow_server['uri']}"]
    try:
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=400)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output.decode(errors="replace")[-3000:]
        assert b"finished secret-run: step 2" in done.stdout
        secrets = [secret.encode(), *(password.encode() for password in PASSWORDS)]
        sessions = list(ray_temp.rglob("session_*"))
        assert sessions and any((s / "logs").is_dir() for s in sessions)
        for one in secrets:  # runs/, the server's store, artifacts and log, Ray's logs
            written = [*files_holding(tmp_path, one), *files_holding(mlflow_server["folder"], one),
                       *files_holding(ray_temp, one)]
            assert one not in output and written == [], written
        # The search looks where the run wrote: the shard URL (a param, the saved config) and
        # the worker's own output (Ray's logs) are found the same way.
        assert len(files_holding(tmp_path, shards["train"].encode())
                   + files_holding(mlflow_server["folder"], shards["train"].encode())) >= 2
        assert files_holding(ray_temp, b"training t2t_vit_tiny for 2 steps")
        assert any(path.name == "model.pth" or path.suffix == ".pkl"
                   for path in (mlflow_server["folder"] / "artifacts").rglob("*"))
        # The run and its model, as the admin reads them through the server.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
        client = MlflowClient(mlflow_server["uri"])
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    filter_string=f"tags.`{RUN_NAME_TAG}` = 'secret-run'")
        assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] > 0
        assert run.info.user_id == TRAINING  # the server records who logged it
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
