"""The whole job as a user runs it (``python jobs/pretrain.py``, against the session's Ray
cluster), ended from outside three times and run again each time with the same command:

- Ctrl-C (SIGINT to the job's process group, and to its Ray workers), then SIGTERM (to the
  driver) on the resumed run: each time a checkpoint of that step, the MLflow run KILLED,
  exit 130 / 143, and the same command resumes there;
- then the driver SIGKILLed right after a checkpoint was completed by every rank (often before
  Ray Train's controller registered it), a torn checkpoint newer than it on disk: the same
  command resumes at the complete one, names the torn one and why, and trains to the end in
  the same MLflow run, every metric step logged once and every sample seen once across the
  four runs; the MLflow run then explains itself (source tags, datasets, the architecture as
  built, each model once with a signature); and once more, the finished run says so in one
  line, in seconds, without Ray.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from t2t_dist.checkpoint import missing_parts
from t2t_dist.data import describe_shards
from t2t_dist.models import get_config
from t2t_dist.tracking import RUN_NAME_TAG
from test_faults_worker import (EPOCH_STEPS, GLOBAL_BATCH, first_shards, registered_checkpoint,
                                train_worker_pids)

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "pretrain.py"
STEPS = 2 * EPOCH_STEPS  # two epochs: room for three stops before the end


def job_argv(digits, tmp_path, *settings) -> list[str]:
    settings = [
        f"data.train_urls={first_shards(digits['train'], 2)}",
        f"data.val_urls={first_shards(digits['val'], 1)}", "model.compile=false",
        f"data.global_batch={GLOBAL_BATCH}", "data.eval_batch=100", "optim.lr=1e-3",
        f"optim.reference_batch={GLOBAL_BATCH}", "optim.epochs=2", "optim.warmup_epochs=0.25",
        "optim.ema_decay=0.9", "engine.precision=fp32", "run.name=killed-job",
        f"run.storage_path={tmp_path}/runs", f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "run.log_every=1", "run.checkpoint_every=3", "run.log_model=false", "run.max_failures=1",
        "scaling.num_workers=2", *settings]
    return [sys.executable, str(JOB), "--model", "t2t_vit_tiny",
            *[arg for setting in settings for arg in ("--set", setting)]]


def complete_checkpoint(run_dir: Path) -> str:
    """The newest checkpoint every rank completed (commit markers and sizes), "" if none."""
    for folder in sorted(run_dir.glob("checkpoint_step_*"), reverse=True):
        try:
            if not missing_parts(folder):
                return folder.name
        except OSError:  # being written
            continue
    return ""


def checkpoint_number(name: str) -> int:
    """``checkpoint_step_00000006`` -> 6; "" (none) -> 0."""
    return int(name.rsplit("_", 1)[1]) if name else 0


def wait_for_workers_to_end(cluster, since: float) -> None:
    """Ray ends a dead driver's workers; wait for them, so a resubmission is the only writer."""
    deadline = time.monotonic() + 60
    while train_worker_pids(cluster.process.pid, since):
        assert time.monotonic() < deadline, "the killed job's workers are still running"
        time.sleep(0.5)


def mlflow_run(tmp_path, name):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("t2t-dist-demo")
    [run] = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    return client, run


def assert_one_run_logged_every_step(client, run, name: str, last_step: int) -> None:
    """Across the restarts: still the one MLflow run of ``name``, finished, every training step
    logged once (none lost, none twice)."""
    [again] = client.search_runs([run.info.experiment_id],
                                 filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(1, last_step + 1))


def stop_with(signum, argv, env, cluster, run_dir, after: int = 0) -> int:
    """Run the job and stop it with ``signum`` at its first progress line past step ``after``:
    Ctrl-C (SIGINT to its process group and to its Ray workers) or SIGTERM (to the driver).
    Checks how it ended; returns the step of the checkpoint it stopped with."""
    name = signal.Signals(signum).name
    started = time.time() - 1
    job = subprocess.Popen(argv, cwd=run_dir.parents[1], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, workers = [], []
    for line in job.stdout:  # the workers train: the driver is inside fit
        lines.append(line)
        progress = re.match(r"step (\d+)/\d+ \|", line)
        if progress and int(progress[1]) > after:
            if signum == signal.SIGINT:
                workers = train_worker_pids(cluster.process.pid, started)
                os.killpg(job.pid, signal.SIGINT)
                for pid in workers:
                    os.kill(pid, signal.SIGINT)
            else:
                job.send_signal(signal.SIGTERM)
            break
    lines += job.stdout.readlines()
    output = "".join(lines)
    assert job.wait(timeout=120) == 128 + signum, output[-3000:]
    assert signum != signal.SIGINT or len(workers) == 2, workers
    assert f"{name} received: the workers commit a checkpoint" in output
    assert re.findall(r"resumed at step (\d+)", output) == ([str(after)] if after else [])
    [stopped] = re.findall(rf"pretrain: stopped on {name} at step (\d+) with checkpoint \S+"
                           r"checkpoint_step_(\d+); the same command resumes killed-job", output)
    step = int(stopped[0])
    assert stopped[1] == f"{step:08d}" and after < step < STEPS and step % 2 == 0, (
        output[-3000:])
    assert complete_checkpoint(run_dir) == f"checkpoint_step_{step:08d}"
    return step


@pytest.mark.ray(cpus=2)
@pytest.mark.slow
def test_stopped_twice_then_killed_the_same_command_resumes_each_time_into_one_run(
        ray_cluster, digits_shards, tmp_path):
    """Ctrl-C in a terminal: SIGINT to its foreground process group. The driver runs in a
    session of its own; the job's Ray workers (in process groups of their own under Ray) get
    it too. SIGTERM, to the driver alone: what Slurm's SIGUSR1 becomes (``ray_on_slurm.py``
    forwards it as SIGTERM). Both end the same way (``stop.stop_on_signals``). Then SIGKILL:
    the driver gets no say, and a save it interrupted is left torn on disk. The same command
    resumes each time, into one MLflow run that explains itself; once finished, it says so."""
    argv = job_argv(digits_shards, tmp_path, "run.log_model=true", "run.stop_check_every=2")
    env, run_dir = ray_cluster.env(), tmp_path / "runs" / "killed-job"
    interrupted = stop_with(signal.SIGINT, argv, env, ray_cluster, run_dir)
    client, run = mlflow_run(tmp_path, "killed-job")
    assert run.info.status == "KILLED"
    terminated = stop_with(signal.SIGTERM, argv, env, ray_cluster, run_dir, after=interrupted)
    assert client.get_run(run.info.run_id).info.status == "KILLED"

    # SIGKILL, once every rank has completed a checkpoint past the SIGTERM's (often before
    # Ray Train's controller registered it).
    started = time.time() - 1
    with open(tmp_path / "killed.log", "wb") as log:
        killed = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while (checkpoint_number(complete_checkpoint(run_dir)) <= terminated
               and killed.poll() is None):
            assert time.monotonic() < deadline, "no checkpoint completed in 240 s"
            time.sleep(0.02)
        assert killed.poll() is None, "the job ended before it could be killed"
        os.killpg(killed.pid, signal.SIGKILL)  # the driver and anything it started itself
        killed.wait(timeout=30)
    wait_for_workers_to_end(ray_cluster, started)
    killed_at = complete_checkpoint(run_dir)
    step = checkpoint_number(killed_at)
    registered = registered_checkpoint(run_dir)  # Ray Train's latest: often an older one, or none
    # A save the kill interrupted, newer than it: rank 1's part never arrived.
    torn = run_dir / f"checkpoint_step_{step + 1:08d}"
    shutil.copytree(run_dir / killed_at, torn)
    (torn / "client" / "rank_00001.pt").unlink()
    logged_before = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]

    resumed = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    output = resumed.stdout + resumed.stderr
    print(f"stopped at {interrupted} (Ctrl-C) and {terminated} (SIGTERM); driver killed once "
          f"{killed_at} was complete (Ray Train had registered {registered or 'none'}); steps "
          f"{logged_before} logged; rerun:\n{output[-3000:]}")
    assert resumed.returncode == 0, output[-3000:]
    assert re.findall(r"resumed at step (\d+)", output) == [str(step)]
    passed_over = [line for line in resumed.stderr.splitlines() if "skipping checkpoint" in line]
    assert [line for line in passed_over  # the kill may have interrupted a save of its own
            if f"{torn.name}: rank 1's part is missing or unreadable" in line], passed_over
    if registered != killed_at:
        assert f"resuming from {run_dir / killed_at}: every rank completed it" in resumed.stdout
    assert f"finished killed-job: step {STEPS}" in resumed.stdout
    assert_one_run_logged_every_step(client, run, "killed-job", STEPS)
    final = run_dir / f"checkpoint_step_{STEPS:08d}"
    seen = torch.load(final / "client" / "rank_00000.pt", weights_only=False)["samples_seen"]
    # Every sample of both epochs seen once across the four runs: none lost, none repeated.
    assert [seen[epoch]["samples"] for epoch in (0, 1)] == [EPOCH_STEPS * GLOBAL_BATCH] * 2

    # The MLflow run explains itself, read back through MLflow's client.
    run = client.get_run(run.info.run_id)
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "jobs/pretrain.py"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == commit and len(commit) == 40
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["training", "validation"]
    assert inputs["training"].digest == describe_shards(first_shards(digits_shards["train"], 2))[
        "digest"]
    assert all(len(dataset.digest) == 16 for dataset in inputs.values())
    variant = get_config("t2t_vit_tiny")
    assert (run.data.params["model.depth"], run.data.params["model.embed_dim"]) == (
        str(variant.depth), str(variant.embed_dim))
    assert int(run.data.params["model.params"]) > 0 and "tune.space" not in run.data.params
    outputs = run.outputs.model_outputs
    models = sorted((client.get_logged_model(o.model_id).name, o.step) for o in outputs)
    assert models == [("model", STEPS), ("model_ema", STEPS)]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    for output in outputs:
        assert mlflow.models.get_model_info(f"models:/{output.model_id}").signature is not None
    first_keys = list(run.data.metrics)[:3]
    assert first_keys[:2] == ["train/loss", "train/lr"], first_keys
    assert not [key for key in run.data.metrics if key.startswith("data/skipped")]

    # Once more: the run is finished. One line, no Ray (its address leads nowhere), no model
    # logged again, in seconds.
    began = time.monotonic()
    again = subprocess.run(argv, cwd=tmp_path, env={**env, "RAY_ADDRESS": "127.0.0.1:9"},
                           capture_output=True, text=True, timeout=120)
    took = time.monotonic() - began
    print(f"finished run again: {took:.1f} s: {again.stdout.strip()}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("\n") == 1 and again.stderr == ""
    assert again.stdout.startswith(f"pretrain: killed-job finished already at step {STEPS}")
    assert len(client.get_run(run.info.run_id).outputs.model_outputs) == 2
    assert took < 60  # generous: ~3 s on an idle 2-core machine, most of it imports


