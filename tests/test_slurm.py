"""cluster/slurm/ against a real single-node Slurm started here (tests/slurm_cluster.py):
the sbatch scripts start Ray over the allocation, run jobs/pretrain.py on the digits demo and
stop cleanly; a preempted (SIGUSR1) job is requeued by Slurm and resumes from its checkpoint;
a cancelled (SIGTERM) one leaves Ray stopped and its last checkpoint intact, and a
resubmission resumes from it.

Not in the default run (a few minutes, installs packages, runs daemons as root):
    T2T_RUN_SLURM=1 .venv/bin/python -m pytest tests/test_slurm.py
"""

from __future__ import annotations

import os
import random
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmUnavailable, start_slurm

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "cluster" / "slurm"
VENV_BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 420.0

pytestmark = [
    pytest.mark.slurm, pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("T2T_RUN_SLURM") != "1",
                       reason="starts a real Slurm (installs packages, runs daemons as root) and "
                              "takes minutes: T2T_RUN_SLURM=1 pytest tests/test_slurm.py"),
]


def free_port_base() -> int:
    """A base with ports base..base+999 all free on 127.0.0.1 (Ray's explicit port range)."""
    for _ in range(50):
        base = random.randrange(20000, 59000, 1000)
        try:
            for port in range(base, base + 1000):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free range of 1000 ports")


@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = start_slurm()
    except SlurmUnavailable as error:
        pytest.skip(f"no local Slurm: {error}")
    yield cluster
    # Jobs first (their own stop path stops their Ray), then the daemons.
    cluster.run("scancel", "--full", "--user=root", check=False)
    deadline = time.monotonic() + 60
    while cluster.run("squeue", "--noheader", check=False).strip() and time.monotonic() < deadline:
        time.sleep(1)
    cluster.stop()


class Job:
    """One submission of an sbatch script of cluster/slurm/ with the scaled-down demo."""

    def __init__(self, slurm, tmp: Path, digits: dict[str, str], name: str, script: str,
                 *overrides: str):
        self.slurm, self.tmp, self.name = slurm, tmp, name
        self.storage = tmp / "runs"
        self.tracking_uri = f"sqlite:///{tmp}/mlflow.db"
        self.args = ["--config", "jobs/configs/demo.yaml",
                     "--set", f"data.train_urls={digits['train']}",
                     "--set", f"data.val_urls={digits['val']}",
                     "--set", f"run.name={name}", "--set", f"run.storage_path={self.storage}",
                     "--set", f"run.tracking_uri={self.tracking_uri}",
                     "--set", "run.log_model=false", "--set", "scaling.num_workers=1",
                     "--set", "optim.epochs=2"]
        for override in overrides:
            self.args += ["--set", override]
        self.script = SLURM_DIR / script
        self.output = tmp / f"{name}.out"

    def submit(self) -> str:
        # Command-line options override the script's #SBATCH lines: this node has 2 CPUs,
        # no GPU, ~20 GB.
        out = self.slurm.run(
            "sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", "--gpus-per-node=0",
            "--mem=0", f"--chdir={ROOT}", f"--output={self.output}", str(self.script),
            "jobs/pretrain.py", *self.args,
            PATH=f"{VENV_BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="disabled",
            T2T_RAY_PORT_BASE=str(free_port_base()), T2T_RAY_TEMP_ROOT=str(self.slurm.root),
            T2T_RAY_LOG_DIR=str(self.tmp), DS_ACCELERATOR="cpu", RAY_ADDRESS="")
        return out.strip().split(";")[0]

    def text(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def wait(self, job_id: str, predicate, what: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.slurm.job(job_id)
            if predicate(info):
                return info
            time.sleep(1)
        raise AssertionError(f"job {job_id}: no {what} in {timeout:.0f}s: {info}\n"
                             f"--- output ---\n{self.text()[-4000:]}")

    def wait_ended(self, job_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
        ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
        return self.wait(job_id, lambda info: info["JobState"] in ended, "end", timeout)

    def checkpoints(self) -> list[str]:
        """Checkpoint folders Ray Train registered (its snapshot), oldest first."""
        snapshot = self.storage / self.name / "checkpoint_manager_snapshot.json"
        if not snapshot.exists():
            return []
        return sorted(set(re.findall(r"checkpoint_step_\d{8}", snapshot.read_text())))

    def wait_for_checkpoint(self, job_id: str, after_step: int = 0) -> int:
        def newer(info):
            steps = [int(name.rsplit("_", 1)[1]) for name in self.checkpoints()]
            return bool(steps) and max(steps) > after_step
        self.wait(job_id, newer, f"checkpoint after step {after_step}")
        return max(int(name.rsplit("_", 1)[1]) for name in self.checkpoints())


def ray_processes_of(job_id: str, temp_root: Path) -> list[str]:
    """Command lines of live processes that belong to job ``job_id``'s Ray (its temp dir)."""
    marker = f"{temp_root}/ray-{job_id}"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            zombie = "\nState:\tZ" in (proc / "status").read_text()
        except OSError:
            continue
        if marker in cmdline and not zombie:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def assert_ray_stopped(job_id: str, slurm) -> None:
    deadline = time.monotonic() + 30
    while (left := ray_processes_of(job_id, slurm.root)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, f"Ray processes of job {job_id} still running:\n" + "\n".join(left)


def mlflow_runs(job: Job):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(job.tracking_uri)
    experiment = client.get_experiment_by_name("t2t-dist-demo")
    assert experiment is not None, "no MLflow experiment t2t-dist-demo"
    return client, client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.`t2t_dist.run_name` = '{job.name}'")


def test_sbatch_runs_pretraining_to_completion(slurm, digits_shards, tmp_path):
    job = Job(slurm, tmp_path, digits_shards, "slurm-demo", "ray.sbatch",
              "run.max_steps=6", "run.log_every=2")
    started = time.monotonic()
    job_id = job.submit()
    info = job.wait_ended(job_id)
    text = job.text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
    assert info["ExitCode"] == "0:0"
    assert "finished slurm-demo: step 6" in text
    assert "ray_on_slurm: Ray stopped" in text
    assert job.checkpoints() == ["checkpoint_step_00000006"]
    checkpoint = job.storage / "slurm-demo" / "checkpoint_step_00000006"
    assert any(checkpoint.rglob("*")), "the checkpoint folder is empty"
    client, runs = mlflow_runs(job)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert max(m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")) == 6
    assert_ray_stopped(job_id, slurm)
    print(f"slurm demo job: {time.monotonic() - started:.1f} s from sbatch to COMPLETED")


def test_preempted_job_requeues_and_cancelled_job_resumes(slurm, digits_shards, tmp_path):
    job = Job(slurm, tmp_path, digits_shards, "slurm-preempt", "ray-shared.sbatch",
              "optim.epochs=10", "run.max_steps=100", "run.checkpoint_every=4", "run.log_every=1",
              "run.stop_check_every=2")
    started = time.monotonic()
    job_id = job.submit()

    # 1. Preemption / the time limit's early signal: SIGUSR1 to the batch script only, what
    #    `--signal=B:USR1@120` sends. The workers commit a checkpoint of the step they are at,
    #    Ray stops, the job requeues itself and resumes at exactly that step.
    first = job.wait_for_checkpoint(job_id)
    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    job.wait(job_id, lambda info: int(info.get("Restarts", 0)) >= 1, "requeue")
    # Slurm holds a requeued job for ~2 minutes (its BeginTime); what we test is that it comes
    # back and resumes, so let it start now.
    slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
    resumed = job.wait(job_id, lambda info: "resumed at step" in job.text(), "resume")
    match = re.search(r"resumed at step (\d+)", job.text())
    [stopped] = re.findall(r"pretrain: stopped on SIGTERM at step (\d+) with checkpoint", job.text())
    assert int(match.group(1)) == int(stopped) >= first, (match.group(1), stopped, first)
    assert "SIGUSR1 received" in job.text() and "requeued" in job.text()
    assert int(resumed["Restarts"]) == 1

    # 2. scancel (SIGTERM to every step and the script) mid-run: Ray stops, the last
    #    complete checkpoint stays registered and loadable.
    second = job.wait_for_checkpoint(job_id, after_step=int(match.group(1)))
    slurm.run("scancel", job_id)
    info = job.wait_ended(job_id, timeout=90)
    assert info["JobState"] == "CANCELLED", info
    assert_ray_stopped(job_id, slurm)
    kept = job.checkpoints()
    assert kept and int(kept[-1].rsplit("_", 1)[1]) >= second
    assert (job.storage / "slurm-preempt" / kept[-1]).is_dir()

    # 3. The same command again: resumes from that checkpoint, finishes, one MLflow run.
    resubmitted = job.submit()
    info = job.wait_ended(resubmitted)
    text = job.text()
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
    resumes = [int(step) for step in re.findall(r"resumed at step (\d+)", text)]
    assert len(resumes) == 2 and resumes[1] >= int(kept[-1].rsplit("_", 1)[1]) > resumes[0]
    assert "finished slurm-preempt: step 100" in text
    assert_ray_stopped(resubmitted, slurm)
    client, runs = mlflow_runs(job)
    assert len(runs) == 1, "one MLflow run across the requeue and the resubmission"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")]
    assert max(steps) == 100 and steps.count(1) == 1, "step 1 logged once: no start-over"
    print(f"preempt/cancel/resume: {time.monotonic() - started:.1f} s; checkpoints {first}, "
          f"{second}; resumed at {resumes}")
