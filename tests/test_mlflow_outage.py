"""MLflow unreachable at start and mid-run: training goes on, one warning per outage, the
metrics are buffered and arrive (each step once, in order) when the server is back, also a
write the server stored but never answered (a proxy drops that answer); still down at the end:
written to a local file whose path the warning gives.

A real ``mlflow server`` (sqlite backend, artifacts served) on a free port, stopped and
started again on the same port and store; the tracker runs in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ray_cluster import free_port
from t2t_dist.tracking import FAST_FAIL_ENV, MlflowTracker

VENV_BIN = Path(sys.executable).parent


# A tracking server as cluster/k8s/mlflow.yaml runs it: without MLflow's job runner (8 more
# processes importing MLflow at every start, for GenAI jobs a training run never makes).
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}


class MlflowServer:
    """``mlflow server`` on 127.0.0.1:port over an sqlite file; ``start``/``stop`` keep both."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        command = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
                   "--artifacts-destination", str(self.folder / "artifacts")]
        log = open(self.folder / "server.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.folder, start_new_session=True,
                                        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}",
                                             **SERVER_ENV})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server not up in {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: server + workers
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None


class AnswerLosingProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``target``. Every request reaches the server; while
    ``lose`` is set, the answer to a metrics write is dropped and the connection closed, as when
    a server goes down right after storing a request. ``lost``: answers dropped so far."""

    def __init__(self, target: str) -> None:
        self.lose, self.lost = False, 0
        proxy = self

        class Forward(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                request = urllib.request.Request(target + self.path, data=body or None,
                                                 method=self.command, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=30) as answer:
                        status, answer_headers, payload = answer.status, answer.headers, answer.read()
                except urllib.error.HTTPError as error:
                    status, answer_headers, payload = error.code, error.headers, error.read()
                except urllib.error.URLError:  # the server is down
                    self.send_error(502)
                    return
                if proxy.lose and self.path.endswith("/runs/log-batch"):
                    proxy.lost += 1
                    self.close_connection = True  # stored, never answered
                    return
                self.send_response(status)
                for key, value in answer_headers.items():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PATCH = do_DELETE = forward

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.uri = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server(tmp_path, monkeypatch):
    for name, value in FAST_FAIL_ENV.items():  # what the tracker sets; restored afterwards
        monkeypatch.setenv(name, value)
    server = MlflowServer(tmp_path)
    yield server
    server.stop()


def timed_log(tracker, step: int) -> float:
    started = time.perf_counter()
    tracker.log({"train/loss": 1.0 / step, "train/lr": 0.1 * step}, step=step)
    return time.perf_counter() - started


def warnings(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if "WARNING: " in line]


@pytest.mark.slow
def test_outage_at_start_and_mid_run_buffers_and_catches_up(server, tmp_path, capfd):
    # Down at start: the tracker comes up anyway, logging costs no waiting.
    tracker = MlflowTracker(tracking_uri=server.uri, experiment="outage", run_name="flaky",
                            params={"optim.lr": "0.001"}, tags={"git_commit": "abc"},
                            system_metrics=False, retry_every_s=0.5,
                            offline_path=tmp_path / "offline.jsonl")
    tracker.log_dict({"optim": {"lr": 0.001}}, "config.yaml")
    assert max(timed_log(tracker, step) for step in (1, 2, 3)) < 1.0
    assert tracker.run_id is None
    [warning] = warnings(capfd)
    assert server.uri in warning and "training goes on" in warning

    server.start()
    time.sleep(0.6)  # past the retry interval: the next log reaches the server
    timed_log(tracker, 4)
    assert tracker.run_id is not None and tracker.down_since is None
    run_id = tracker.run_id

    # Down mid-run: one more warning, then the buffer catches up when it is back.
    server.stop()
    for step in (5, 6, 7):
        assert timed_log(tracker, step) < 15.0  # one failed call at most (no MLflow retries)
    tracker.set_tags({"checkpoint_location": "/runs/flaky"})
    assert len(warnings(capfd)) == 1
    server.start()
    time.sleep(0.6)
    timed_log(tracker, 8)
    tracker.close()
    assert warnings(capfd) == [] and tracker.outages == 2

    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / s) for s in range(1, 9)]
    assert [m.step for m in client.get_metric_history(run_id, "train/lr")] == list(range(1, 9))
    assert run.data.params == {"optim.lr": "0.001"}
    assert run.data.tags["git_commit"] == "abc"
    assert run.data.tags["checkpoint_location"] == "/runs/flaky"
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    assert not (tmp_path / "offline.jsonl").exists()

    # Resumed under the same name (a restarted worker group replays steps 7-8): each step once.
    again = MlflowTracker(tracking_uri=server.uri, experiment="outage", run_name="flaky",
                          params={"optim.lr": "0.001"}, system_metrics=False)
    assert again.run_id == run_id and again.resumed
    for step in (7, 8, 9):
        again.log({"train/loss": 1.0 / step}, step=step)
    again.close()
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, 10))


@pytest.mark.slow
def test_a_lost_answer_is_not_resent_and_what_stays_unsent_is_written_locally(server, tmp_path,
                                                                            capfd):
    """A metrics write the server stored but never answered (the chaos run's duplicate step: the
    server went down in between) is not sent again once the server answers; what a server still
    down at the end never got is written to a local file, whose path the warning gives."""
    server.start()
    proxy = AnswerLosingProxy(server.uri)
    offline = tmp_path / "offline.jsonl"
    try:
        tracker = MlflowTracker(tracking_uri=proxy.uri, experiment="outage", run_name="lossy",
                                params={}, system_metrics=False, retry_every_s=0.1,
                                offline_path=offline)
        timed_log(tracker, 1)
        proxy.lose = True
        timed_log(tracker, 2)
        assert proxy.lost == 1 and tracker.down_since is not None  # an outage, to the tracker
        proxy.lose = False
        time.sleep(0.2)  # past the retry interval
        timed_log(tracker, 3)
        assert tracker.down_since is None
        history = MlflowClient(server.uri).get_metric_history(tracker.run_id, "train/loss")
        assert [m.step for m in history] == [1, 2, 3]

        server.stop()
        for step in (4, 5):
            timed_log(tracker, step)
        tracker.close("FINISHED")
    finally:
        proxy.stop()
    lines = warnings(capfd)
    assert len(lines) == 3 and str(offline) in lines[2]
    records = [json.loads(line) for line in offline.read_text().splitlines()]
    assert records[0]["run_id"] == tracker.run_id and records[0]["status"] == "FINISHED"
    assert [r["step"] for r in records[1:]] == [4, 5]
    assert records[1]["metrics"] == {"train/loss": 0.25, "train/lr": 0.4}


@pytest.mark.ray(cpus=2)
@pytest.mark.slow
def test_job_trains_through_an_unreachable_tracking_server(ray_cluster, digits_shards, tmp_path):
    """``python jobs/pretrain.py`` with ``run.tracking_uri`` at a port nothing listens on: the
    run finishes, one warning, and the metrics and model are kept beside the checkpoints."""
    uri = f"http://127.0.0.1:{free_port()}"
    argv = [sys.executable, str(Path(__file__).resolve().parents[1] / "jobs" / "pretrain.py"),
            "--model", "t2t_vit_tiny", "--set", f"data.train_urls={digits_shards['train']}",
            "--set", f"data.val_urls={digits_shards['val']}", "--set", "data.global_batch=16",
            "--set", "optim.reference_batch=16", "--set", "scaling.num_workers=1",
            "--set", "run.max_steps=3", "--set", "run.log_every=1", "--set", "run.name=no-mlflow",
            "--set", f"run.storage_path={tmp_path}/runs", "--set", f"run.tracking_uri={uri}"]
    done = subprocess.run(argv, cwd=tmp_path, env=ray_cluster.env(), capture_output=True,
                          text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "finished no-mlflow: step 3" in done.stdout, output[-3000:]
    run_dir = tmp_path / "runs" / "no-mlflow"
    offline = run_dir / "mlflow-offline.jsonl"
    unreachable = [line for line in output.splitlines() if f"MLflow at {uri} is unreachable (" in line]
    assert len(unreachable) == 1 and "training goes on" in unreachable[0], output[-3000:]
    assert f"written to {offline}" in output and "model 'model' saved to" in output
    records = [json.loads(line) for line in offline.read_text().splitlines()]
    assert records[0]["run_id"] is None and records[0]["params"]["optim.lr"]
    steps = [r["step"] for r in records[1:] if "train/loss" in r["metrics"]]
    assert steps == [1, 2, 3]
    assert (run_dir / "mlflow-offline-model" / "MLmodel").is_file()
