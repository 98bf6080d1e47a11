"""Ray Tune sweeps end to end: jobs/sweep.py as its own driver process on the session's Ray
cluster, tiny models on the digits shards, one CPU worker per trial, MLflow on sqlite.

The 4-trial sweep runs to the end with ASHA; the restore test kills the driver mid-sweep
and runs the same command again.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from t2t_dist.launch.report import CSV_NAME, PLOT_NAME, STATUS_TAG, SWEEP_TAG
from t2t_dist.launch.sweep import REPORTED_METRICS
from t2t_dist.tracking import RUN_NAME_TAG

ROOT = Path(__file__).resolve().parents[1]
# Good learning rates first: they set each ASHA rung's bar before the hopeless ones (lr ~1e-6)
# arrive there, so ASHA has something to stop.
TRIALS = [
    {"optim.lr": 4.0e-3, "model.depth": 2, "model.embed_dim": 32},
    {"optim.lr": 2.0e-3, "model.depth": 1, "model.embed_dim": 64},
    {"optim.lr": 2.0e-6, "model.depth": 2, "model.embed_dim": 64},
    {"optim.lr": 1.0e-6, "model.depth": 1, "model.embed_dim": 32},
]


def sweep_yaml(tmp_path, digits, name, *, scheduler="asha", trials=TRIALS, concurrent=2, epochs=3):
    """A sweep config file: t2t_vit_tiny at 32 px, ``epochs`` of 23 steps, one worker a trial."""
    config = {
        "model": {"name": "t2t_vit_tiny", "img_size": 32, "num_classes": 10, "compile": False,
                  "drop_path_rate": 0.0},
        "data": {"train_urls": digits["train"], "val_urls": digits["val"], "global_batch": 64,
                 "eval_batch": 150, "loader_workers": 0, "rand_augment_ops": 0,
                 "random_erasing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
                 "mixup_prob": 0.0, "hflip": 0.0, "crop_scale": [0.6, 1.0]},
        "optim": {"lr": 1e-3, "reference_batch": 64, "epochs": epochs, "warmup_epochs": 0.2,
                  "cooldown_epochs": 0, "ema_decay": 0.0, "grad_clip": 1.0},
        "engine": {"precision": "fp32"},
        "run": {"name": name, "storage_path": str(tmp_path / "runs"), "log_every": 1,
                "log_model": False, "max_failures": 0, "experiment": "sweeps",
                "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.99},
        "tune": {"name": name, "search": "grid", "space": {"trial": {"grid": trials}},
                 "metric": "val/top1", "mode": "max", "scheduler": scheduler,
                 "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": concurrent},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def sweep_env(ray_cluster):
    # The Train controller polls workers every 2 s by default: an epoch-end report waits that long.
    return {**ray_cluster.env(), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
            "TUNE_GLOBAL_CHECKPOINT_S": "1", "DS_ACCELERATOR": "cpu"}


def start_sweep(config_path, ray_cluster, log_path):
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "sweep.py"), "--config",
                             str(config_path)], cwd=ROOT, env=sweep_env(ray_cluster),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def children(tmp_path, name):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("sweeps")
    if experiment is None:
        return client, None, []
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string=f"tags.`{SWEEP_TAG}` = '{name}/parent'")
    kids = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{SWEEP_TAG}` = '{name}/trial'")
    return client, (parents[0] if parents else None), kids


def history_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


@pytest.mark.ray
@pytest.mark.slow
def test_four_trial_asha_sweep_logs_parent_children_csv_and_plot(ray_cluster, digits_shards,
                                                                   tmp_path):
    # 8 epochs: on a quiet machine an epoch takes ~1.3 s, and a 3-epoch trial ended before
    # ASHA's stop (decided on its first report) reached it.
    config_path = sweep_yaml(tmp_path, digits_shards, "asha4", epochs=8)
    started = time.perf_counter()
    process = start_sweep(config_path, ray_cluster, tmp_path / "sweep.log")
    assert process.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()[-5000:]
    output = (tmp_path / "sweep.log").read_text()
    print(f"sweep took {time.perf_counter() - started:.1f}s")
    print(output[output.rindex("trial "):] if "trial " in output else output[-3000:])

    client, parent, kids = children(tmp_path, "asha4")
    assert parent is not None and parent.info.status == "FINISHED"
    assert parent.data.params["tune.metric"] == "val/top1"
    assert parent.data.params["tune.scheduler"] == "asha"
    assert "tune.space.trial.grid" in parent.data.params
    assert len(kids) == 4
    by_lr = {}
    for kid in kids:
        assert kid.data.tags["mlflow.parentRunId"] == parent.info.run_id
        params = kid.data.params  # the trial's full resolved config
        assert params["model.name"] == "t2t_vit_tiny" and "data.global_batch" in params
        by_lr[float(params["optim.lr"])] = kid
        assert kid.data.metrics["model/params"] > 0 and kid.data.metrics["model/gmacs"] > 0
        assert history_steps(client, kid.info.run_id, "val/top1")
        status = kid.data.tags[STATUS_TAG]
        assert (status, kid.info.status) in {("completed", "FINISHED"),
                                             ("early-stopped", "KILLED")}, status
    assert sorted(by_lr) == sorted(t["optim.lr"] for t in TRIALS)
    # The overrides reached the model: the same depth at twice the width has more params.
    wide, narrow = by_lr[2.0e-6], by_lr[4.0e-3]  # depth 2: embed 64 vs 32
    assert wide.data.params["model.embed_dim"] == "64"
    assert wide.data.metrics["model/params"] > 2 * narrow.data.metrics["model/params"]

    statuses = [k.data.tags[STATUS_TAG] for k in kids]
    assert "early-stopped" in statuses and "completed" in statuses, statuses
    full = max(max(history_steps(client, k.info.run_id, "train/loss")) for k in kids)
    assert full == 8 * (1500 // 64)
    for kid in kids:
        steps = max(history_steps(client, kid.info.run_id, "train/loss"))
        assert (steps < full) == (kid.data.tags[STATUS_TAG] == "early-stopped")

    # Every metric we promise Tune is in every report of every trial.
    results = list((tmp_path / "runs" / "asha4").glob("*/result.json"))
    assert len(results) == 4
    for result in results:
        for line in result.read_text().splitlines():
            report = json.loads(line)
            assert all(key in report for key in REPORTED_METRICS), sorted(report)

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {CSV_NAME, PLOT_NAME} <= artifacts
    folder = client.download_artifacts(parent.info.run_id, "", str(tmp_path / "artifacts"))
    with open(Path(folder) / CSV_NAME) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["stop_reason"] for r in rows} == set(statuses)
    assert {"optim.lr", "model.depth", "params", "gmacs", "best_val/top1", "steps"} <= set(rows[0])
    png = (Path(folder) / PLOT_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    keep = os.environ.get("T2T_KEEP_SWEEP_PLOT")  # to look at the picture
    if keep:
        Path(keep).write_bytes(png)

    # The report command reads the same table back from MLflow, best first.
    report = subprocess.run([sys.executable, "-m", "t2t_dist.cli", "sweep", "report", "asha4",
                             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                            capture_output=True, text=True, cwd=ROOT, check=True).stdout
    print(report)
    lines = report.splitlines()
    assert lines[0].startswith("sweep asha4: 4 trials") and lines[-1].startswith("plot: ")
    assert Path(lines[-1][len("plot: "):]).is_file()
    best = [float(line.split()[-3]) for line in lines[3:-1]]
    assert len(best) == 4 and best == sorted(best, reverse=True)
    assert abs(best[0] - max(float(r["best_val/top1"]) for r in rows)) < 0.01


@pytest.mark.ray
@pytest.mark.slow
def test_killed_sweep_driver_resumes_without_rerunning_finished_trials(
        ray_cluster, digits_shards, tmp_path):
    trials = TRIALS[:3]
    config_path = sweep_yaml(tmp_path, digits_shards, "resume3", scheduler="fifo",
                             trials=trials, concurrent=1)
    log_path = tmp_path / "sweep.log"
    process = start_sweep(config_path, ray_cluster, log_path)
    # Kill the driver once trial 1 has finished and trial 2 has reported its first epoch.
    deadline = time.monotonic() + 400
    finished = second = None
    while time.monotonic() < deadline and process.poll() is None:
        client, _, kids = children(tmp_path, "resume3")
        finished = [k for k in kids if k.info.status == "FINISHED"]
        running = [k for k in kids if k.info.status == "RUNNING"
                   and history_steps(client, k.info.run_id, "val/top1")]
        if finished and running:
            second = running[0]
            break
        time.sleep(1)
    assert second is not None, log_path.read_text()[-5000:]
    time.sleep(2)  # let Tune save its state (TUNE_GLOBAL_CHECKPOINT_S=1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    first_end = {k.info.run_id: k.info.end_time for k in finished}
    first_losses = {k.info.run_id: history_steps(client, k.info.run_id, "train/loss")
                    for k in finished}

    again = start_sweep(config_path, ray_cluster, log_path)
    assert again.wait(timeout=500) == 0, log_path.read_text()[-5000:]
    client, parent, kids = children(tmp_path, "resume3")
    assert len(kids) == 3 and parent.info.status == "FINISHED"
    assert len({k.data.tags[RUN_NAME_TAG] for k in kids}) == 3  # no trial started twice
    for kid in kids:
        assert kid.info.status == "FINISHED" and kid.data.tags[STATUS_TAG] == "completed"
        steps = history_steps(client, kid.info.run_id, "train/loss")
        assert max(steps) == 3 * (1500 // 64)
        if kid.info.run_id in first_end:  # finished before the kill: not run again
            assert kid.info.end_time == first_end[kid.info.run_id]
            assert steps == first_losses[kid.info.run_id]
    # The interrupted trial resumed from its own epoch-end checkpoint, not from step 1.
    resumed = history_steps(client, second.info.run_id, "train/loss")
    assert resumed.count(1) == 1 and len(resumed) < 2 * max(resumed)
    assert "resumed at step" in log_path.read_text()
