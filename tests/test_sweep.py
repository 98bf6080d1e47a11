"""Ray Tune sweeps end to end: jobs/sweep.py as its own driver process on the session's Ray
cluster, tiny models on the digits shards, one CPU worker per trial, MLflow on sqlite.

The README's scaled-down depth x width sweep runs to the end with ASHA, its driver killed once
on the way (SIGKILL, once Tune has saved that a trial finished and another has checkpointed an
epoch) and the same command run again: no placement group stays reserved, finished trials are
not run again, the interrupted one resumes from its epoch-end checkpoint, and the sweep's
results are those a user reads in the README.
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from t2t_dist.config import load_config
from t2t_dist.launch.report import (BEST_CONFIG_NAME, CSV_NAME, PLOT_NAME, STATUS_TAG,
                                    STOP_REASON_TAG, SWEEP_TAG, TRIAL_ID_TAG)
from t2t_dist.launch.sweep import REPORTED_METRICS
from t2t_dist.tracking import RUN_NAME_TAG
from test_faults_job import complete_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def sweep_env(ray_cluster):
    return {**ray_cluster.env(), "TUNE_GLOBAL_CHECKPOINT_S": "1", "DS_ACCELERATOR": "cpu"}


def start_sweep(config_path, ray_cluster, log_path, overrides=()):
    log = open(log_path, "ab")
    sets = [arg for item in overrides for arg in ("--set", item)]
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / "sweep.py"), "--config",
                             str(config_path), *sets], cwd=ROOT, env=sweep_env(ray_cluster),
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


def placement_groups_left(ray_cluster) -> list[str]:
    """Placement groups of the cluster not yet removed, as ``id state``."""
    from ray.util.state import list_placement_groups

    groups = list_placement_groups(address=ray_cluster.dashboard_url, raise_on_missing_output=False)
    return [f"{group.placement_group_id} {group.state}" for group in groups
            if group.state != "REMOVED"]


def history_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def checkpointed_epoch(run_dir: Path) -> int:
    """The epoch of the newest checkpoint every rank completed (what a restart resumes from),
    -1 if none."""
    name = complete_checkpoint(run_dir)
    return int(name.rsplit("_", 1)[1]) // 23 if name else -1


def tune_saved_status(sweep_dir: Path) -> dict[str, str]:
    """Each trial's status in the experiment state Tune saved to the sweep's storage, the one a
    restore reads (empty until the first save; a file caught mid-copy reads as not yet saved)."""
    saved = sorted(sweep_dir.glob("experiment_state-*.json"))
    try:
        trials = json.loads(saved[-1].read_text())["trial_data"] if saved else []
    except (OSError, ValueError):
        return {}
    return {state["trial_id"]: state["status"]
            for state in (json.loads(entry[0]) for entry in trials)}


def at_epoch(client, run_id, epoch, key="val/top1"):
    """A trial's ``key`` at the end of ``epoch`` (23 steps each)."""
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}[23 * epoch]


@pytest.mark.ray
@pytest.mark.slow
def test_readme_sweep_killed_once_resumes_learns_and_asha_stops_the_worse(
        ray_cluster, digits_shards, tmp_path):
    """The README's scaled-down depth x width sweep, as a user runs it (its own storage and
    MLflow here), its driver killed once and the same command run again: the trials learn,
    differ visibly by width, and ASHA stops clearly worse ones; MLflow then holds the parent,
    a child per trial, results.csv, best_config.yaml and the plot, and ``t2t-dist sweep
    report`` reads them back."""
    name = "depth-width-digits"
    overrides = [f"data.train_urls={digits_shards['train']}",
                 f"data.val_urls={digits_shards['val']}",
                 f"run.storage_path={tmp_path / 'runs'}", "run.experiment=sweeps",
                 f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    config_path = ROOT / "jobs" / "configs" / "sweep_depth_width_digits.yaml"
    log_path = tmp_path / "sweep.log"
    started = time.perf_counter()
    process = start_sweep(config_path, ray_cluster, log_path, overrides)
    # Kill the driver once a trial has finished, Tune's saved state (what the restore reads)
    # says so, and another trial has just checkpointed an epoch that is not one of ASHA's rungs
    # (2 and 4), so ASHA cannot stop it before the kill and it must be resumed. (Seen otherwise:
    # killed right after an epoch-2 report that ASHA stopped; after an evaluation was logged but
    # before its checkpoint was written; before Tune had saved that a trial finished.)
    deadline = time.monotonic() + 600
    finished = interrupted = None
    while time.monotonic() < deadline and process.poll() is None:
        client, _, kids = children(tmp_path, name)
        saved = tune_saved_status(tmp_path / "runs" / name)
        finished = [k for k in kids if k.info.status == "FINISHED"]
        running = [k for k in kids if k.info.status == "RUNNING" and checkpointed_epoch(
            tmp_path / "runs" / name / "train" / k.data.tags[RUN_NAME_TAG]) in (1, 3, 5, 6, 7)]
        if finished and running and all(
                saved.get(k.data.tags[TRIAL_ID_TAG]) == "TERMINATED" for k in finished):
            interrupted = running[0]
            break
        time.sleep(0.25)
    assert interrupted is not None, log_path.read_text()[-5000:]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    # Nothing the killed sweep reserved stays reserved: by Ray's state API (addressed to this
    # cluster: other Ray clusters run on the host), every placement group of its trials and
    # their Train worker groups is removed. (README, known gaps: once seen otherwise.)
    killed_at, reserved = time.monotonic(), placement_groups_left(ray_cluster)
    while reserved and time.monotonic() < killed_at + 90:
        time.sleep(1)
        reserved = placement_groups_left(ray_cluster)
    assert not reserved, f"placement groups still reserved 90 s after the kill: {reserved}"
    print(f"no placement group left {time.monotonic() - killed_at:.1f} s after the kill")
    first_end = {k.info.run_id: k.info.end_time for k in finished}
    first_losses = {k.info.run_id: history_steps(client, k.info.run_id, "train/loss")
                    for k in finished}
    killed_log = log_path.read_text()

    again = start_sweep(config_path, ray_cluster, log_path, overrides)
    assert again.wait(timeout=900) == 0, log_path.read_text()[-5000:]
    output = log_path.read_text()[len(killed_log):]
    print(f"sweep took {time.perf_counter() - started:.1f}s, killed once")
    print(output[output.rindex("trial "):] if "trial " in output else output[-3000:])

    client, parent, kids = children(tmp_path, name)
    assert parent is not None and parent.info.status == "FINISHED"
    assert parent.data.params["tune.scheduler"] == "asha"
    assert len(kids) == 6
    assert len({k.data.tags[RUN_NAME_TAG] for k in kids}) == 6  # no trial started twice
    for kid in kids:
        if kid.info.run_id in first_end:  # finished before the kill: not run again
            assert kid.info.end_time == first_end[kid.info.run_id]
            assert history_steps(client, kid.info.run_id, "train/loss") == first_losses[
                kid.info.run_id]
    # The interrupted trial resumed from its own epoch-end checkpoint, not from step 1.
    resumed = [int(step) for step in re.findall(r"resumed at step (\d+)", output)]
    assert resumed and all(step > 0 and step % 23 == 0 for step in resumed), resumed
    steps = history_steps(client, interrupted.info.run_id, "train/loss")
    assert len(steps) == len(set(steps))  # each logged once across the restore
    full = 8 * 23
    top1, width_at_2, stopped = {}, {}, []
    for kid in kids:
        assert kid.data.tags["mlflow.parentRunId"] == parent.info.run_id
        params, status = kid.data.params, kid.data.tags[STATUS_TAG]
        assert params["model.name"] == "t2t_vit_tiny" and "data.global_batch" in params
        assert kid.data.metrics["model/params"] > 0 and kid.data.metrics["model/gmacs"] > 0
        history = {m.step: m.value
                   for m in client.get_metric_history(kid.info.run_id, "val/top1")}
        top1[kid.info.run_id] = max(history.values())
        # The compare page's metric: the best so far, logged first (NaN before any report),
        # at the end the best the worker logged (it may still log an epoch after the close).
        assert kid.data.metrics["best/val/top1"] <= top1[kid.info.run_id] + 1e-9
        if status == "completed":
            assert kid.data.metrics["best/val/top1"] == pytest.approx(top1[kid.info.run_id])
        width_at_2.setdefault(int(params["model.embed_dim"]), []).append(history[46])
        steps = max(history_steps(client, kid.info.run_id, "train/loss") + list(history))
        reason = kid.data.tags[STOP_REASON_TAG]
        if status == "completed":
            assert kid.info.status == "FINISHED" and steps == full and reason == "completed"
        else:  # stopped after its rung's report: its steps are those it ran, not 0
            assert (status, kid.info.status) == ("early-stopped", "KILLED"), status
            assert reason.startswith("ASHA at epoch "), reason
            epoch = int(reason.split()[3].rstrip(":"))
            assert 23 * epoch <= steps < full and max(history) >= 23 * epoch
            stopped.append((kid, epoch))

    # 1. The trials learn: the best passes 90% (digits has 10 classes: chance is 10%).
    best = max(top1.values())
    assert best >= 90.0, top1
    # 2. They differ visibly by the swept values: at epoch 2 (every trial's first rung) each
    #    wider width is ahead of every narrower one, 64 wide by 20 points over 16 wide.
    assert min(width_at_2[64]) > max(width_at_2[32]), width_at_2
    assert min(width_at_2[32]) > max(width_at_2[16]), width_at_2
    assert min(width_at_2[64]) - max(width_at_2[16]) >= 20.0, width_at_2
    # 3. ASHA stops at least one clearly worse trial: 10 points behind the best trial at
    #    the epoch it was stopped.
    best_kid = max(kids, key=lambda k: top1[k.info.run_id])
    behind = [at_epoch(client, best_kid.info.run_id, epoch)
              - at_epoch(client, kid.info.run_id, epoch) for kid, epoch in stopped]
    assert behind and max(behind) >= 10.0, behind

    # Every metric we promise Tune is in every report of every trial.
    results = list((tmp_path / "runs" / name).glob("*/result.json"))
    assert len(results) == 6
    for result in results:
        for line in result.read_text().splitlines():
            report = json.loads(line)
            assert all(key in report for key in REPORTED_METRICS), sorted(report)

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {CSV_NAME, PLOT_NAME, BEST_CONFIG_NAME} <= artifacts
    folder = Path(client.download_artifacts(parent.info.run_id, "", str(tmp_path / "artifacts")))
    with open(folder / CSV_NAME) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"completed", "early-stopped"}
    assert {"model.depth", "model.embed_dim", "params", "gmacs", "best_val/top1", "steps",
            "stop_reason"} <= set(rows[0])
    png = (folder / PLOT_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    keep = os.environ.get("T2T_KEEP_SWEEP_PLOT")  # to look at the picture
    if keep:
        Path(keep).write_bytes(png)
    trained = load_config(folder / BEST_CONFIG_NAME)
    assert trained.run.name == f"{name}-best" and trained.tune.space == {}
    assert trained.model.embed_dim == int(best_kid.data.params["model.embed_dim"])
    assert trained.model.depth == int(best_kid.data.params["model.depth"])

    # The report command reads the same table back from MLflow, best first, with the plot,
    # the best trial's config and the command that trains it.
    report = subprocess.run([sys.executable, "-m", "t2t_dist.cli", "sweep", "report", name,
                             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                            capture_output=True, text=True, cwd=ROOT, check=True).stdout
    print(report)
    lines = report.splitlines()
    assert lines[0].startswith(f"sweep {name}: 6 trials")
    plot, best_line, command = lines[-3:]
    assert plot.startswith("plot: ") and Path(plot[len("plot: "):]).is_file()
    assert best_line.startswith(f"best: {best_kid.info.run_name} (val/top1 {best:.2f})")
    config_path = command.rsplit(" ", 1)[-1]
    assert command == f"train it fully: python jobs/pretrain.py --config {config_path}"
    assert load_config(config_path) == trained
    table = [line.split() for line in lines[3:-3]]
    assert len(table) == 6 and [float(cells[6]) for cells in table] == sorted(
        (float(cells[6]) for cells in table), reverse=True)
    assert abs(float(table[0][6]) - best) < 0.01
