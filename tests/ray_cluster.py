"""A private one-node Ray cluster for the tests: `ray start --head --block` on free ports.

Shared by every Ray test of the session (started on first use, stopped at session end by
its own PID, never `ray stop`). Token auth is decided explicitly: disabled for the head and
for every driver, so a ~/.ray/auth_token on this machine changes nothing.

Its logical CPUs: the machine's cores, or more when a collected test asks for more with
``@pytest.mark.ray(cpus=N)`` (Ray only counts; the OS shares the cores), so a 2-core CI
machine still runs two 1-CPU workers and a bigger machine gets no artificial cap.

    from ray_cluster import ray_cluster  # noqa: F401  (the fixture)
    @pytest.mark.ray(cpus=2)
    def test_x(ray_cluster): ray_cluster.address, ray_cluster.dashboard_url
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
DRIVER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
              "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayCluster:
    process: subprocess.Popen
    address: str  # host:port of the GCS, for ray.init / RAY_ADDRESS
    dashboard_url: str  # for `ray job submit --address`
    temp_dir: str
    log_path: Path

    def env(self) -> dict[str, str]:
        """Environment for a driver process of this cluster."""
        return {**os.environ, **DRIVER_ENV, "RAY_ADDRESS": self.address}

    def stop(self) -> None:
        if self.process.poll() is None:
            # On SIGINT `ray start --block` tears down the processes it started (1-4 s);
            # SIGTERM leaves it waiting. After a long session it sometimes waits on.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # What the teardown leaves (the dashboard's forkserver and module processes) or never
        # reached: the head ran in a session of its own, so its process group is ours alone.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def cluster_cpus(items) -> int:
    """The machine's cores, or the most any of ``items`` asks for with ``mark.ray(cpus=N)``."""
    asked = [marker.kwargs.get("cpus", 0) for item in items for marker in item.iter_markers("ray")]
    return max([os.cpu_count() or 1, *asked])


def start_cluster(num_cpus: int, timeout: float = 120.0) -> RayCluster:
    temp_dir = tempfile.mkdtemp(prefix="t2t-ray-")
    port, dashboard_port = free_port(), free_port()
    log_path = Path(temp_dir) / "ray-start.log"
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}",
        f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--num-gpus=0",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        "--disable-usage-stats",
    ]
    env = {**os.environ, **DRIVER_ENV, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    cluster = RayCluster(process, f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}",
                         temp_dir, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{cluster.dashboard_url}/api/version", timeout=2):
                return cluster
        except OSError:
            time.sleep(1)
    cluster.stop()
    raise RuntimeError(f"Ray head not up in {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")


_CLUSTER: RayCluster | None = None


@pytest.fixture(scope="session")
def ray_cluster(request):
    """One Ray head for the whole session, whichever test module asks first."""
    global _CLUSTER
    if _CLUSTER is None:
        _CLUSTER = start_cluster(cluster_cpus(request.session.items))
    yield _CLUSTER
    if _CLUSTER is not None:
        _CLUSTER.stop()
        _CLUSTER = None


_DIGITS: dict[str, str] | None = None


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """scikit-learn digits as train/val shards (32 px JPEGs): ``{"train": pattern, "val": ...}``."""
    global _DIGITS
    if _DIGITS is None:
        from t2t_dist.data import make_digits_dataset

        _DIGITS = make_digits_dataset(str(tmp_path_factory.mktemp("digits")), img_size=32)
    return _DIGITS


@pytest.fixture(scope="module")
def driver(ray_cluster):
    """This test process as the Ray driver of the session's cluster (per test module)."""
    import ray

    os.environ.update(DRIVER_ENV)
    ray.init(address=ray_cluster.address, logging_level="WARNING")
    yield ray_cluster
    ray.shutdown()
