"""What the node-loss and chaos tests share: a Ray cluster of several nodes on this host, the
demo job as a user runs it (``python jobs/pretrain.py``) with its output in a file, and the
checks on what a run left behind (checkpoints, the samples-seen ledger, its MLflow run).

Every wait is bounded: ``wait_for`` raises ``TimeoutError`` with the job's last output.

    cluster = Cluster.start(tmp_path, cpus_per_node=1, nodes=2)      # head "node_0" + "node_1"
    job = Job.start(argv, env=cluster.env(), log=tmp_path / "job.log")
    job.wait_for(r"step (\\d+)/\\d+ \\|", timeout=300)
    cluster.lose(cluster.nodes[-1]); cluster.add_node()
    assert job.wait(timeout=900) == 0
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ray_cluster import RayCluster, RayNode, start_cluster, start_worker_node
from t2t_dist.checkpoint import CHECKPOINT_PREFIX, client_path, missing_parts
from t2t_dist.tracking import RUN_NAME_TAG

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "jobs" / "pretrain.py"
DEMO_CONFIG = ROOT / "jobs" / "configs" / "demo.yaml"
OBJECT_STORE_BYTES = 300 * 1024**2  # per node; the demo passes little through it
PROGRESS = re.compile(r"\bstep (\d+)/(\d+) \|")  # Ray prefixes worker lines


@dataclass
class Cluster:
    """A head and worker nodes on this host, each with ``cpus_per_node`` CPUs and a resource
    of its own (``node_0`` on the head, ``node_1``, ... on the others), so a 1-CPU worker per
    node lands one per node. A node that is lost and replaced keeps its resource name."""

    head: RayCluster
    cpus_per_node: int
    nodes: list[RayNode] = field(default_factory=list)  # alive worker nodes
    lost: list[RayNode] = field(default_factory=list)

    @classmethod
    def start(cls, *, cpus_per_node: int = 1, nodes: int = 2) -> "Cluster":
        head = start_cluster(cpus_per_node, resources={"node_0": 1},
                             object_store_bytes=OBJECT_STORE_BYTES)
        cluster = cls(head, cpus_per_node)
        try:
            for index in range(1, nodes):
                cluster.add_node(f"node_{index}")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def env(self, **extra: str) -> dict[str, str]:
        return {**self.head.env(), **extra}

    def add_node(self, resource: str = "") -> RayNode:
        """Join a node (by default with the resource of the last lost one)."""
        resource = resource or self.lost_resources().pop(0)
        node = start_worker_node(self.head, num_cpus=self.cpus_per_node,
                                 resources={resource: 1}, object_store_bytes=OBJECT_STORE_BYTES)
        self.nodes.append(node)
        return node

    def lost_resources(self) -> list[str]:
        alive = {name for node in self.nodes for name in node.resources}
        return [name for node in self.lost for name in node.resources if name not in alive]

    def lose(self, node: RayNode) -> int:
        """SIGKILL everything the node runs, as a lost machine; returns how many processes."""
        self.nodes.remove(node)
        self.lost.append(node)
        return node.kill()

    def stop(self) -> None:
        for node in [*self.nodes, *self.lost]:
            node.stop()
        self.head.stop()


class WorkerLogs:
    """What the Ray workers on every node of a cluster print, read from their log files as they
    are written (``<temp dir>/session_*/logs/worker-*.out|err``): the driver's forwarded copy
    lags by tens of seconds on a loaded machine. Rank 0 prints our lines; after a restart
    another process (another file) does.

        logs.mark()                                        # from now on
        where, found = logs.wait_for(r"resumed at step (\\d+)", timeout=300, alive=job)
        logs.wait_for(PROGRESS, timeout=300, alive=job, after=(where, found.end()))
    """

    def __init__(self, cluster: "Cluster") -> None:
        self.cluster = cluster
        self.marks: dict[Path, int] = {}

    def files(self) -> list[Path]:
        folders = [self.cluster.head.temp_dir, *(n.temp_dir for n in self.cluster.nodes),
                   *(n.temp_dir for n in self.cluster.lost)]
        return [path for folder in folders
                for path in Path(folder).glob("session_latest/logs/worker-*.[oe][ur][tr]")]

    def mark(self) -> None:
        self.marks = {}
        for path in self.files():
            try:
                self.marks[path] = path.stat().st_size
            except FileNotFoundError:  # Ray removes the logs of workers that ended
                continue

    def new_text(self) -> dict[Path, str]:
        """Each file's whole lines written since ``mark``."""
        texts = {}
        for path in self.files():
            try:
                with open(path, "rb") as read:
                    read.seek(self.marks.get(path, 0))
                    data = read.read()
            except FileNotFoundError:
                continue
            data = data[:data.rfind(b"\n") + 1]
            if data:
                texts[path] = data.decode(errors="replace")
        return texts

    def steps(self) -> list[int]:
        """Progress steps printed since ``mark``, in any order."""
        return [int(m[1]) for text in self.new_text().values() for m in PROGRESS.finditer(text)]

    def wait_for(self, pattern: str | re.Pattern, *, timeout: float, alive: "Job",
                 after: tuple[Path, int] | None = None) -> tuple[Path, re.Match]:
        """The first match of ``pattern`` written since ``mark`` (only in file ``after[0]``
        past position ``after[1]`` when given). Raises when the job ends or time runs out."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            for path, text in self.new_text().items():
                if after is not None and path != after[0]:
                    continue
                found = regex.search(text, after[1] if after else 0)
                if found:
                    return path, found
            if alive.process.poll() is not None:
                raise RuntimeError(f"job exited {alive.process.returncode} before {pattern!r}:\n"
                                   f"{alive.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} in the workers' logs within {timeout:.0f} s; "
                                   f"driver output:\n{alive.output()[-3000:]}")
            time.sleep(0.2)


def train_worker_nodes(head: RayCluster) -> list[str]:
    """Node ids of the alive Ray Train workers (Ray's state API, addressed explicitly)."""
    from ray.util.state import list_actors

    actors = list_actors(address=head.dashboard_url, raise_on_missing_output=False,
                         filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return sorted(actor.node_id for actor in actors)


def demo_argv(name: str, tmp_path: Path, *settings: str) -> list[str]:
    """``python jobs/pretrain.py`` on the demo config, its run and MLflow store in ``tmp_path``."""
    base = [f"run.name={name}", f"run.storage_path={tmp_path}/runs",
            f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *settings]
    return [sys.executable, str(PRETRAIN), "--config", str(DEMO_CONFIG),
            *[arg for setting in base for arg in ("--set", setting)]]


class Job:
    """A job driver process in a session of its own, its output (stdout + stderr) in ``log``."""

    def __init__(self, argv: list[str], *, env: dict[str, str], log: Path, cwd: Path = ROOT):
        self.argv, self.env, self.log, self.started = argv, env, log, time.monotonic()
        self._offset = log.stat().st_size if log.exists() else 0  # this submission's output
        self._text, self._bytes = "", b""
        with open(log, "ab") as out:
            self.process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        """This submission's output so far (read incrementally: the log grows to megabytes)."""
        with open(self.log, "rb") as read:
            read.seek(self._offset)
            new = read.read()
        self._offset += len(new)
        data = self._bytes + new
        complete = data.rfind(b"\n") + 1  # whole lines only; the rest waits for its end
        self._text += data[:complete].decode(errors="replace")
        self._bytes = data[complete:]
        return self._text

    def steps(self) -> list[int]:
        """The steps of this submission's progress lines so far."""
        return [int(m[1]) for m in PROGRESS.finditer(self.output())]

    def wait_for(self, pattern: str, *, timeout: float, start: int = 0) -> re.Match:
        """The first match of ``pattern`` in the output from character ``start`` on; raises
        ``TimeoutError`` (or ``RuntimeError`` when the job ended first)."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern, re.M).search(self.output(), start)
            if found:
                return found
            if self.process.poll() is not None:
                found = re.compile(pattern, re.M).search(self.output(), start)
                if found:
                    return found
                raise RuntimeError(f"job exited {self.process.returncode} before {pattern!r}:\n"
                                   f"{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} within {timeout:.0f} s:\n{self.output()[-4000:]}")
            time.sleep(0.2)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def wait(self, *, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"job still running after {timeout:.0f} s:\n"
                               f"{self.output()[-4000:]}") from None

    def kill(self) -> None:
        """End the driver and anything it started itself (its session)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)


def registered_checkpoint(run_dir: Path) -> str:
    """The latest checkpoint Ray Train's controller registered for the run ("" if none yet)."""
    try:
        found = re.findall(rf"{CHECKPOINT_PREFIX}\d+(?:\.\d+)?",
                           (run_dir / "checkpoint_manager_snapshot.json").read_text())
    except OSError:
        return ""
    return max(found, default="")


def complete_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the checkpoint folders every rank completed (our commit markers), ascending."""
    steps = []
    for folder in sorted(run_dir.glob(f"{CHECKPOINT_PREFIX}*")):
        if folder.is_dir() and not missing_parts(folder):
            steps.append(int(folder.name[len(CHECKPOINT_PREFIX):]))
    return steps


def final_ledger(run_dir: Path, step: int) -> dict[int, dict[str, int]]:
    """The samples-seen ledger (per epoch: count, fingerprint) of the run's step ``step``."""
    client = torch.load(client_path(run_dir / f"{CHECKPOINT_PREFIX}{step:08d}", 0),
                        weights_only=False)
    return client["samples_seen"]


def mlflow_run(tracking_uri: str, experiment: str, name: str):
    """``(client, runs)``: every MLflow run of the experiment tagged with run name ``name``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return client, []
    return client, client.search_runs([found.experiment_id],
                                      filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every logged value of ``key``, in step order."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def summary_metric(output: str, key: str) -> float:
    """A number of the job's closing line (``finished NAME: step N, val/top1 96.63, ...``)."""
    found = re.search(rf"^finished \S+: step \d+, .*?{re.escape(key)} ([\d.]+)", output, re.M)
    if not found:
        raise AssertionError(f"no {key} in the closing line:\n{output[-3000:]}")
    return float(found[1])
