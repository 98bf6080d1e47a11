"""A sweep in MLflow: one parent run per sweep, one nested child per trial, and the results
read back from them (one row per trial, the table, ``results.csv``, ``best_config.yaml`` and
the plot).

    experiment, parent_id = open_parent(config)     # main process; found again on resume
    open_child(trial, sweep=config, experiment=..., parent_id=..., trial_id=..., values=...)
    log_best(config.run.tracking_uri, run_id, "val/top1", 91.3, step=92)  # each report
    close_child(config.run.tracking_uri, experiment, trial_id, failed=False, reason=...)
    rows, table = finish_parent(config, parent_id)  # results.csv, best config, plot on the parent
    print(sweep_report("arch-transfer", tracking_uri))  # later, from any process

The trial's rank-0 worker continues its child run (``MlflowTracker`` finds runs by run name).
The plot (``launch.figure``) follows the paper's Figure 1: best top-1 against GMACs and
against parameters.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2t_dist.config import Config, flatten, save_config, to_dict
from t2t_dist.launch.figure import plot_sweep
from t2t_dist.launch.sweep import flat_values, model_cost, trial_config
from t2t_dist.tracking import MAX_PARAM_LENGTH, RUN_NAME_TAG, experiment_id, find_run, mlflow_client

SWEEP_TAG = "t2t_dist.sweep"  # "<name>/parent" or "<name>/trial"
SWEEP_FIELDS_TAG = "t2t_dist.sweep_fields"  # JSON list of the dotted fields the space sets
TRIAL_VALUES_TAG = "t2t_dist.trial_values"  # JSON of one trial's values
STATUS_TAG = "t2t_dist.trial_status"  # running, completed, early-stopped, failed
STOP_REASON_TAG = "t2t_dist.stop_reason"  # why it ended: "ASHA at epoch 2: val/top1 46.5 < 73.6"
TRIAL_ID_TAG = "t2t_dist.trial_id"
CSV_NAME = "results.csv"
BEST_CONFIG_NAME = "best_config.yaml"
PLOT_NAME = "sweep_top1_vs_cost.png"


@dataclass
class Row:
    """One trial as MLflow holds it."""

    run_name: str
    run_id: str
    values: dict[str, Any]  # the trial's swept values, dotted: {"model.depth": 2, ...}
    params: float  # parameters of the trial's model; nan when unknown
    gmacs: float  # per image at the run's image size
    best: float  # best value of the sweep's metric (nan when never reported)
    steps: int  # optimizer steps run, to the last record (an epoch end for a stopped trial)
    status: str  # running, completed, early-stopped, failed
    reason: str = ""  # how it ended, in words (STOP_REASON_TAG)


def _metric_history(client, run_id: str, key: str) -> list:
    return client.get_metric_history(run_id, key)


def sweep_rows(client, parent_id: str) -> list[Row]:
    """Every child run of the sweep's parent, with its best metric and steps run."""
    parent = client.get_run(parent_id)
    metric = parent.data.params.get("tune.metric", "val/top1")
    mode = parent.data.params.get("tune.mode", "max")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=10_000)
    rows = []
    for child in sorted(children, key=lambda run: run.info.start_time):
        history = _metric_history(client, child.info.run_id, metric)
        values = [m.value for m in history]
        best = (max(values) if mode == "max" else min(values)) if values else float("nan")
        # train/loss is logged every run.log_every steps, the metric at every epoch end: a
        # trial stopped after its first epoch may have no train/loss record at all.
        steps = [m.step for m in _metric_history(client, child.info.run_id, "train/loss")]
        steps += [m.step for m in history]
        metrics, tags = child.data.metrics, child.data.tags
        rows.append(Row(run_name=child.info.run_name, run_id=child.info.run_id,
                        values=json.loads(tags.get(TRIAL_VALUES_TAG, "{}")),
                        params=metrics.get("model/params", float("nan")),
                        gmacs=metrics.get("model/gmacs", float("nan")), best=best,
                        steps=max(steps, default=0), status=tags.get(STATUS_TAG, "unknown"),
                        reason=tags.get(STOP_REASON_TAG, "")))
    return rows


def _ranked(rows: list[Row], mode: str) -> list[Row]:
    sign = -1 if mode == "max" else 1
    return sorted(rows, key=lambda r: (r.best != r.best, sign * r.best if r.best == r.best else 0))


def best_row(rows: list[Row], mode: str = "max") -> Row | None:
    """The trial with the best metric (failed and never-reported trials left out)."""
    ranked = [r for r in _ranked(rows, mode) if r.best == r.best and r.status != "failed"]
    return ranked[0] if ranked else None


def _cell(value: Any) -> str:
    """A table cell: floats to 4 significant digits (random search draws 0.0018789852...)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: list[Row], fields: list[str], metric: str, mode: str = "max") -> str:
    """Text table, best trial first: the varied values, params (M), GMACs, best metric,
    steps run, how the trial ended and why."""
    header = ["trial", *[f.rsplit(".", 1)[-1] for f in fields], "params (M)", "GMACs",
              f"best {metric}", "steps", "status", "stop reason"]
    lines = []
    for row in _ranked(rows, mode):
        lines.append([row.run_name.rsplit("-", 1)[-1],
                      *[_cell(row.values.get(f, "-")) for f in fields],
                      f"{row.params / 1e6:.4g}", f"{row.gmacs:.4g}", f"{row.best:.2f}",
                      str(row.steps), row.status, row.reason or "-"])
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
            for cells in [header, ["-" * w for w in widths], *lines]]
    return "\n".join(text)


def write_csv(rows: list[Row], path: str | Path, fields: list[str], metric: str) -> None:
    """One row per trial: varied values, params, GMACs, best metric, steps run, status and
    stop reason."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "run_id", *fields, "params", "gmacs", f"best_{metric}",
                         "steps", "status", "stop_reason"])
        for row in rows:
            writer.writerow([row.run_name, row.run_id, *[row.values.get(f, "") for f in fields],
                             int(row.params) if row.params == row.params else "",
                             f"{row.gmacs:.6f}", f"{row.best:.4f}", row.steps, row.status,
                             row.reason])


def best_config(config: Config, row: Row) -> Config:
    """The best trial as a run of its own: the sweep's base config with the trial's values,
    named ``<tune.name>-best`` under the sweep's ``run.storage_path`` (not the trial's own
    Train run, which it would resume)."""
    trial = trial_config(config, row.values)
    return dataclasses.replace(trial, run=dataclasses.replace(
        trial.run, name=f"{config.tune.name}-best"))


def train_command(parent, tracking_uri: str) -> str:
    """The one command that trains the best trial on its full schedule, from the parent's
    ``best_config.yaml`` (a local path, or fetched with ``mlflow artifacts download``)."""
    uri = f"{parent.info.artifact_uri.rstrip('/')}/{BEST_CONFIG_NAME}"
    if uri.startswith("file://") or "://" not in uri:
        return f"python jobs/pretrain.py --config {shlex.quote(uri.removeprefix('file://'))}"
    fetch = (f"MLFLOW_TRACKING_URI={shlex.quote(tracking_uri)} mlflow artifacts download "
             f"-r {parent.info.run_id} -a {BEST_CONFIG_NAME}")
    return f'python jobs/pretrain.py --config "$({fetch})"'


def _artifact_path(parent, name: str) -> str:
    path = f"{parent.info.artifact_uri.rstrip('/')}/{name}"
    return path.removeprefix("file://")


def best_lines(rows: list[Row], parent, tracking_uri: str, metric: str, mode: str) -> str:
    """Where the plot and the best trial's config are, and the command that trains it."""
    lines = [f"plot: {_artifact_path(parent, PLOT_NAME)}"]
    best = best_row(rows, mode)
    if best is not None:
        lines += [f"best: {best.run_name} ({metric} {best.best:.2f}), its config: "
                  f"{_artifact_path(parent, BEST_CONFIG_NAME)}",
                  f"train it fully: {train_command(parent, tracking_uri)}"]
    return "\n".join(lines)


def find_parent(client, name: str):
    """The sweep's parent run in any experiment of the store; one-line error if none."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{SWEEP_TAG}` = '{name}/parent'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise ValueError(f"sweep {name!r} not found in this MLflow store: expected the "
                         f"tune.name of a sweep run with jobs/sweep.py (and --tracking-uri)")
    return runs[0]


def sweep_report(name: str, tracking_uri: str) -> str:
    """The results table from MLflow (best first), where the plot and the best trial's config
    are, and the command that trains the best trial fully."""
    client = mlflow_client(tracking_uri)
    parent = find_parent(client, name)
    fields = json.loads(parent.data.tags.get(SWEEP_FIELDS_TAG, "[]"))
    metric = parent.data.params.get("tune.metric", "val/top1")
    mode = parent.data.params.get("tune.mode", "max")
    rows = sweep_rows(client, parent.info.run_id)
    return (f"sweep {name}: {len(rows)} trials, parent run {parent.info.run_id} "
            f"({parent.info.status})\n"
            f"{format_table(rows, fields, metric, mode)}\n"
            f"{best_lines(rows, parent, tracking_uri, metric, mode)}")


# --- writing: the parent run (main process), a child per trial (trial process) ---

def open_parent(config: Config) -> tuple[str, str]:
    """(experiment id, parent run id): the sweep's run, found by name when resuming."""
    client = mlflow_client(config.run.tracking_uri)
    experiment = experiment_id(config.run.tracking_uri, config.run.experiment)
    name = config.tune.name
    parent = find_run(client, experiment, SWEEP_TAG, f"{name}/parent")
    if parent is None:
        parent = client.create_run(experiment, run_name=name, tags={
            SWEEP_TAG: f"{name}/parent", SWEEP_FIELDS_TAG: json.dumps(config.tune.fields())})
        params = {f"tune.{k}": v for k, v in flatten(to_dict(config.tune)).items()}
        params.update({"base.model.name": config.model.name, "base.optim.epochs":
                       config.optim.epochs, "base.scaling.num_workers": config.scaling.num_workers})
        for key, value in params.items():
            client.log_param(parent.info.run_id, key, str(value)[:MAX_PARAM_LENGTH])
    else:
        client.update_run(parent.info.run_id, status="RUNNING")
    return experiment, parent.info.run_id


def best_key(metric: str) -> str:
    """The child-run metric holding the best ``metric`` so far: ``best/val/top1``."""
    return f"best/{metric}"


def open_child(config: Config, *, sweep: Config, experiment: str, parent_id: str, trial_id: str,
               values: dict[str, Any]) -> str:
    """The trial's child run (created once; a resumed trial finds it by its run name), with
    the trial's values and its model's parameters and GMACs.

    Its first metric is ``best/<tune.metric>`` (NaN: nothing reported yet), which
    ``log_best`` keeps current: MLflow's compare page colours its parallel-coordinates plot by
    the runs' first metric and puts their first three differing params (alphabetically: the
    swept fields, as the resolved config names them) on its axes."""
    client = mlflow_client(config.run.tracking_uri)
    found = find_run(client, experiment, RUN_NAME_TAG, config.run.name)
    if found is not None:
        return found.info.run_id
    child = client.create_run(experiment, run_name=config.run.name, tags={
        "mlflow.parentRunId": parent_id, RUN_NAME_TAG: config.run.name,
        SWEEP_TAG: f"{sweep.tune.name}/trial", TRIAL_ID_TAG: trial_id,
        TRIAL_VALUES_TAG: json.dumps(flat_values(values)), STATUS_TAG: "running"})
    client.log_metric(child.info.run_id, best_key(sweep.tune.metric), float("nan"), step=0)
    params, gmacs = model_cost(config)
    client.log_metric(child.info.run_id, "model/params", params, step=0)
    client.log_metric(child.info.run_id, "model/gmacs", gmacs, step=0)
    return child.info.run_id


def child_run_id(tracking_uri: str, experiment: str, trial_id: str) -> str | None:
    """The child run of a Tune trial; None before the trial opened it."""
    child = find_run(mlflow_client(tracking_uri), experiment, TRIAL_ID_TAG, trial_id)
    return child.info.run_id if child is not None else None


def log_best(tracking_uri: str, run_id: str, metric: str, value: float, step: int) -> None:
    """The best ``metric`` so far of a trial (Tune's summary of its reports), at ``step``."""
    mlflow_client(tracking_uri).log_metric(run_id, best_key(metric), value, step=step)


def close_child(tracking_uri: str, experiment: str, trial_id: str, *, failed: bool,
                reason: str = "", metric: str = "", mode: str = "max") -> bool:
    """Close a trial's child run with how the trial ended (``STATUS_TAG``), why
    (``STOP_REASON_TAG``: ``reason``, else the status) and its best ``metric`` as its worker
    logged it (a stopped trial's worker may have finished an epoch more than Tune heard
    of); True when its worker had finished it (the schedule's end), False when Tune stopped
    the trial early or it failed."""
    client = mlflow_client(tracking_uri)
    child = find_run(client, experiment, TRIAL_ID_TAG, trial_id)
    finished = child is not None and child.info.status == "FINISHED" and not failed
    if child is None:
        return finished
    history = client.get_metric_history(child.info.run_id, metric) if metric else []
    if history:
        best = (max if mode == "max" else min)(m.value for m in history)
        client.log_metric(child.info.run_id, best_key(metric), best,
                          step=max(m.step for m in history))
    if failed:
        status, word = "FAILED", "failed"
    else:  # the worker closes its run FINISHED at the end of the schedule
        status, word = ("FINISHED", "completed") if finished else ("KILLED", "early-stopped")
    client.set_tag(child.info.run_id, STATUS_TAG, word)
    client.set_tag(child.info.run_id, STOP_REASON_TAG, reason if reason and not finished else word)
    if child.info.status != status:  # a completed run was closed by its worker
        client.set_terminated(child.info.run_id, status=status)
    return finished


def finish_parent(config: Config, parent_id: str) -> tuple[list[Row], str]:
    """results.csv, best_config.yaml and the top-1 vs cost plot on the parent run; returns
    (rows, the table with where they are and the command that trains the best trial)."""
    client = mlflow_client(config.run.tracking_uri)
    tune = config.tune
    rows = sweep_rows(client, parent_id)
    best = best_row(rows, tune.mode)
    with tempfile.TemporaryDirectory() as folder:
        files = [Path(folder) / CSV_NAME, Path(folder) / PLOT_NAME]
        write_csv(rows, files[0], tune.fields(), tune.metric)
        plot_sweep(rows, files[1], tune.fields(), title=tune.name, metric=tune.metric,
                   mode=tune.mode, kinds=tune.kinds())
        if best is not None:
            files.append(Path(folder) / BEST_CONFIG_NAME)
            save_config(best_config(config, best), files[-1])
        for path in files:
            client.log_artifact(parent_id, str(path))
    all_failed = bool(rows) and all(row.status == "failed" for row in rows)
    client.set_terminated(parent_id, status="FAILED" if all_failed else "FINISHED")
    parent = client.get_run(parent_id)
    return rows, (f"{format_table(rows, tune.fields(), tune.metric, tune.mode)}\n"
                  f"{best_lines(rows, parent, config.run.tracking_uri, tune.metric, tune.mode)}")
