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

import json
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
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: Ray Train's controller polls its workers every 2 s by
# default, and a run's end waits for that poll (measured: 4.3 s from the last worker line to the
# driver's, 0.9 s at 0.25 s); Ray Train hands it from the driver to its controller.
# RAY_TRAIN_ENABLE_PREEMPTION_WATCHER: an actor per run that polls Ray for nodes being drained
# (spot reclaims), which a machine of its own never sees: a process per run, 1.4 s of CPU each
# (measured on an idle machine).
DRIVER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
              "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1",
              "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
              "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


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
        stop_ray_start(self.process, self.temp_dir)


def stop_ray_start(process: subprocess.Popen, temp_dir: str) -> None:
    """End a `ray start --block` (head or node) and everything it began, then its temp dir."""
    if process.poll() is None:
        # On SIGINT `ray start --block` tears down the processes it started (1-4 s);
        # SIGTERM leaves it waiting. After a long session it sometimes waits on.
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    # What the teardown leaves (the dashboard's forkserver and module processes, workers) or
    # never reached: `ray start` ran in a session of its own, so its session is ours alone.
    for leftover in session_processes(process.pid):
        try:
            leftover.send_signal(signal.SIGKILL)
        except Exception:  # gone meanwhile
            pass
    if process.poll() is None:
        process.wait(timeout=10)
    shutil.rmtree(temp_dir, ignore_errors=True)


def cluster_cpus(items) -> int:
    """The machine's cores, or the most any of ``items`` asks for with ``mark.ray(cpus=N)``."""
    asked = [marker.kwargs.get("cpus", 0) for item in items for marker in item.iter_markers("ray")]
    return max([os.cpu_count() or 1, *asked])


def node_options(num_cpus: int, resources: dict[str, float] | None,
                 object_store_bytes: int | None) -> list[str]:
    """What `ray start` needs on any node: CPUs, custom resources, and a free port for every
    agent and manager (two nodes on one host must not share one; Ray's fixed defaults would)."""
    options = [f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               "--disable-usage-stats"]  # node and object manager, workers: random by default
    if resources:
        options.append(f"--resources={json.dumps(resources)}")
    if object_store_bytes:
        options.append(f"--object-store-memory={object_store_bytes}")
    return options


def _start_node(command: list[str], temp_dir: str) -> tuple[subprocess.Popen, Path]:
    """``ray start ... --block`` in a session of its own (so the node's processes, Ray's
    workers included, can be found and ended by session); its output in the temp dir."""
    log_path = Path(temp_dir) / "ray-start.log"
    env = {**os.environ, **DRIVER_ENV, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    return process, log_path


def start_cluster(num_cpus: int, timeout: float = 120.0, *,
                  resources: dict[str, float] | None = None,
                  object_store_bytes: int | None = None) -> RayCluster:
    """A Ray head on free ports in a private temp dir; returns once its dashboard answers."""
    temp_dir = tempfile.mkdtemp(prefix="t2t-ray-")
    port, dashboard_port = free_port(), free_port()
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={port}",
        f"--temp-dir={temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
        *node_options(num_cpus, resources, object_store_bytes),
    ]
    process, log_path = _start_node(command, temp_dir)
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


def session_processes(session: int) -> list:
    """The live processes of one session (psutil), e.g. everything a `ray start` began."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getsid(process.pid) == session:
                found.append(process)
        except (ProcessLookupError, PermissionError):
            continue
    return found


@dataclass
class RayNode:
    """A second Ray node on this host, joined to a head (`ray start --address`)."""

    process: subprocess.Popen
    temp_dir: str
    log_path: Path
    resources: dict[str, float]
    node_id: str = ""

    def kill(self) -> int:
        """Lose the node as a machine is lost: SIGKILL every process it started at once (the
        raylet, its agents and log monitor, and the Ray workers on it). Returns how many."""
        processes = session_processes(self.process.pid)
        for process in processes:
            try:
                process.send_signal(signal.SIGKILL)
            except Exception:  # gone meanwhile
                pass
        self.process.wait(timeout=30)
        return len(processes)

    def stop(self) -> None:
        stop_ray_start(self.process, self.temp_dir)


def alive_nodes(head: RayCluster, *, attempts: int = 5) -> list[dict]:
    """The nodes the head's GCS holds alive, by Ray's state API (addressed explicitly: with
    other Ray clusters on the host an address-less call refuses to choose). A dashboard that
    drops the connection (seen with the host's load at 30-50) is asked again, 2 s apart."""
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    for attempt in range(1, attempts + 1):
        try:
            nodes = list_nodes(address=head.dashboard_url, filters=[("state", "=", "ALIVE")],
                               raise_on_missing_output=False)
            return [{"node_id": n.node_id, "resources": n.resources_total} for n in nodes]
        except (RayStateApiException, ConnectionError):
            if attempt == attempts:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def start_worker_node(head: RayCluster, *, num_cpus: int, resources: dict[str, float],
                      object_store_bytes: int | None = None, timeout: float = 120.0,
                      attempts: int = 3) -> RayNode:
    """Join a node with its own CPUs, resources, ports and temp dir to ``head``; returns once
    the head's GCS lists it alive (found by its first custom resource).

    ``ray start`` gives up when its raylet has not registered within 30 s (fixed in Ray's
    ``node.py``), which a host loaded with other test runs exceeded; a failed join is cleaned
    up (its session's processes) and tried again, ``attempts`` times in all."""
    for attempt in range(1, attempts + 1):
        try:
            return _join_node(head, num_cpus=num_cpus, resources=resources,
                              object_store_bytes=object_store_bytes, timeout=timeout)
        except RuntimeError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _join_node(head: RayCluster, *, num_cpus: int, resources: dict[str, float],
               object_store_bytes: int | None, timeout: float) -> RayNode:
    temp_dir = tempfile.mkdtemp(prefix="t2t-rayn-")
    command = [str(VENV_BIN / "ray"), "start", f"--address={head.address}", "--block",
               f"--temp-dir={temp_dir}", *node_options(num_cpus, resources, object_store_bytes)]
    known = {n["node_id"] for n in alive_nodes(head)}
    process, log_path = _start_node(command, temp_dir)
    node = RayNode(process, temp_dir, log_path, dict(resources))
    marker = next(iter(resources))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log_path.read_text()[-3000:]
            node.stop()  # what it started before giving up, and its temp dir
            raise RuntimeError(f"ray start --address exited {process.returncode}:\n{output}")
        joined = [n for n in alive_nodes(head) if n["node_id"] not in known
                  and marker in n["resources"]]
        if joined:
            node.node_id = joined[0]["node_id"]
            return node
        time.sleep(1)
    output = log_path.read_text()[-3000:]
    node.stop()
    raise RuntimeError(f"Ray node not up in {timeout:.0f}s:\n{output}")


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
