"""The whole job killed (driver and all) and submitted again under the same run name: it
continues from the last complete checkpoint, into the same MLflow run, every metric step
logged once (the steps the killed job logged past its checkpoint are not logged again).
And the job stopped on purpose (SIGTERM to its driver): a checkpoint of that step, exit 143,
the same command resumes there.

``python jobs/pretrain.py`` as a user runs it, against the session's Ray cluster; the
driver's process group is SIGKILLed once Ray Train registered a checkpoint, and Ray ends the
job's workers with it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from t2t_dist.tracking import RUN_NAME_TAG
from test_faults_worker import (EPOCH_STEPS, GLOBAL_BATCH, first_shards, registered_checkpoint,
                                train_worker_pids)

JOB = Path(__file__).resolve().parents[1] / "jobs" / "pretrain.py"
MAX_STEPS = 30  # the stopped job: long enough that the signal lands mid-run


def job_argv(digits, tmp_path) -> list[str]:
    settings = [
        f"data.train_urls={first_shards(digits['train'], 2)}",
        f"data.val_urls={first_shards(digits['val'], 1)}", "model.compile=false",
        f"data.global_batch={GLOBAL_BATCH}", "data.eval_batch=100", "optim.lr=1e-3",
        f"optim.reference_batch={GLOBAL_BATCH}", "optim.epochs=1", "optim.warmup_epochs=0.25",
        "optim.ema_decay=0.9", "engine.precision=fp32", "run.name=killed-job",
        f"run.storage_path={tmp_path}/runs", f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "run.log_every=1", "run.checkpoint_every=3", "run.log_model=false", "run.max_failures=1",
        "scaling.num_workers=2"]
    return [sys.executable, str(JOB), "--model", "t2t_vit_tiny",
            *[arg for setting in settings for arg in ("--set", setting)]]


@pytest.mark.ray(cpus=2)
@pytest.mark.slow
def test_killed_job_resubmitted_continues_the_run_and_its_mlflow_run(ray_cluster, digits_shards,
                                                                     tmp_path):
    argv, env = job_argv(digits_shards, tmp_path), ray_cluster.env()
    run_dir = tmp_path / "runs" / "killed-job"
    started = time.time() - 1
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.monotonic() + 240
        while not registered_checkpoint(run_dir) and first.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint registered in 240 s"
            time.sleep(0.05)
        assert first.poll() is None, "the job ended before it could be killed"
        os.killpg(first.pid, signal.SIGKILL)  # the driver and anything it started itself
        first.wait(timeout=30)
    # Ray ends a dead driver's workers; wait for them, so the resubmission is the only writer.
    deadline = time.monotonic() + 60
    while train_worker_pids(ray_cluster.process.pid, started):
        assert time.monotonic() < deadline, "the killed job's workers are still running"
        time.sleep(0.5)
    killed_at = registered_checkpoint(run_dir)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("t2t-dist-demo")
    [run] = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = 'killed-job'")
    logged_before = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]

    second = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    resumed = [int(s) for s in re.findall(r"resumed at step (\d+)", output)]
    assert resumed == [int(killed_at.rsplit("_", 1)[1])], (resumed, killed_at, output[-3000:])
    assert f"finished killed-job: step {EPOCH_STEPS}" in second.stdout

    [again] = client.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.`{RUN_NAME_TAG}` = 'killed-job'")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    print(f"job killed after {killed_at} with steps {logged_before} logged; resumed at step "
          f"{resumed[0]}; logged steps now {steps}")
    assert steps == list(range(1, EPOCH_STEPS + 1))  # each once, none lost
    assert max(logged_before) >= resumed[0]  # the killed job had logged past its checkpoint

    final = run_dir / f"checkpoint_step_{EPOCH_STEPS:08d}"
    seen = torch.load(final / "client" / "rank_00000.pt", weights_only=False)["samples_seen"]
    assert seen[0]["samples"] == EPOCH_STEPS * GLOBAL_BATCH  # none lost, none repeated


@pytest.mark.ray(cpus=2)
@pytest.mark.slow
def test_sigterm_to_the_driver_checkpoints_that_step_and_the_same_command_resumes(
        ray_cluster, digits_shards, tmp_path):
    """What Slurm's SIGUSR1 (forwarded as SIGTERM by ray_on_slurm.py) does to a running job."""
    argv = job_argv(digits_shards, tmp_path) + [
        "--set", "run.name=stopped-job", "--set", "run.stop_check_every=2",
        "--set", "run.checkpoint_every=100", "--set", "optim.epochs=10",
        "--set", f"run.max_steps={MAX_STEPS}"]
    env, run_dir = ray_cluster.env(), tmp_path / "runs" / "stopped-job"
    first = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in first.stdout:  # the workers train: the driver is inside fit
        lines.append(line)
        if re.search(r"step [1-9]\d*/\d+ \|", line):
            first.send_signal(signal.SIGTERM)
            break
    lines += first.stdout.readlines()
    output = "".join(lines)
    assert first.wait(timeout=120) == 128 + signal.SIGTERM, output[-3000:]
    [stopped] = re.findall(r"pretrain: stopped on SIGTERM at step (\d+) with checkpoint \S+"
                           r"checkpoint_step_(\d+); the same command resumes stopped-job", output)
    step = int(stopped[0])
    assert stopped[1] == f"{step:08d}" and 0 < step < MAX_STEPS and step % 2 == 0, output[-3000:]
    assert registered_checkpoint(run_dir) == f"checkpoint_step_{step:08d}"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("t2t-dist-demo")
    [run] = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = 'stopped-job'")
    assert run.info.status == "KILLED"

    second = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    assert re.findall(r"resumed at step (\d+)", output) == [str(step)]
    assert f"finished stopped-job: step {MAX_STEPS}" in second.stdout
    [again] = client.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.`{RUN_NAME_TAG}` = 'stopped-job'")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(1, MAX_STEPS + 1))  # nothing lost, nothing twice
