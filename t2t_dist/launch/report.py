"""A sweep in MLflow: one parent run per sweep, one nested child per trial, and the results
read back from them (one row per trial, the table, ``results.csv`` and the plot).

    experiment, parent_id = open_parent(config)     # main process; found again on resume
    open_child(trial, sweep=..., experiment=..., parent_id=..., trial_id=..., values=...)
    close_child(config.run.tracking_uri, experiment, trial_id, failed=False)
    rows, table = finish_parent(config, parent_id)  # results.csv and the plot on the parent
    print(sweep_report("arch-transfer", tracking_uri))  # later, from any process

The trial's rank-0 worker continues its child run (``MlflowTracker`` finds runs by run name).
The plot follows the paper's Figure 1: best top-1 against GMACs and against parameters, one
labeled point per trial, early-stopped trials drawn hollow.
"""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2t_dist.config import Config, flatten, to_dict
from t2t_dist.launch.sweep import flat_values, model_cost
from t2t_dist.tracking import MAX_PARAM_LENGTH, RUN_NAME_TAG, experiment_id, find_run, mlflow_client

SWEEP_TAG = "t2t_dist.sweep"  # "<name>/parent" or "<name>/trial"
SWEEP_FIELDS_TAG = "t2t_dist.sweep_fields"  # JSON list of the dotted fields the space sets
TRIAL_VALUES_TAG = "t2t_dist.trial_values"  # JSON of one trial's values
STATUS_TAG = "t2t_dist.trial_status"  # running, completed, early-stopped, failed
TRIAL_ID_TAG = "t2t_dist.trial_id"
CSV_NAME = "results.csv"
PLOT_NAME = "sweep_top1_vs_cost.png"


@dataclass
class Row:
    """One trial as MLflow holds it."""

    run_name: str
    run_id: str
    values: dict[str, Any]
    params: float  # parameters of the trial's model; nan when unknown
    gmacs: float  # per image at the run's image size
    best: float  # best value of the sweep's metric (nan when never reported)
    steps: int  # optimizer steps run
    status: str

    def label(self) -> str:
        """``vit_se`` for a sweep over model names, else ``depth=4, embed_dim=64``."""
        return ", ".join(str(v) if k == "model.name" else f"{k.rsplit('.', 1)[-1]}={v}"
                         for k, v in self.values.items())


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
        history = [m.value for m in _metric_history(client, child.info.run_id, metric)]
        steps = [m.step for m in _metric_history(client, child.info.run_id, "train/loss")]
        best = (max(history) if mode == "max" else min(history)) if history else float("nan")
        metrics = child.data.metrics
        rows.append(Row(run_name=child.info.run_name, run_id=child.info.run_id,
                        values=json.loads(child.data.tags.get(TRIAL_VALUES_TAG, "{}")),
                        params=metrics.get("model/params", float("nan")),
                        gmacs=metrics.get("model/gmacs", float("nan")), best=best,
                        steps=max(steps, default=0),
                        status=child.data.tags.get(STATUS_TAG, "unknown")))
    return rows


def _ranked(rows: list[Row], mode: str) -> list[Row]:
    sign = -1 if mode == "max" else 1
    return sorted(rows, key=lambda r: (r.best != r.best, sign * r.best if r.best == r.best else 0))


def format_table(rows: list[Row], fields: list[str], metric: str, mode: str = "max") -> str:
    """Text table, best trial first: the varied values, params (M), GMACs, best metric,
    steps run and how the trial ended."""
    header = ["trial", *[f.rsplit(".", 1)[-1] for f in fields], "params (M)", "GMACs",
              f"best {metric}", "steps", "status"]
    lines = []
    for row in _ranked(rows, mode):
        lines.append([row.run_name.rsplit("-", 1)[-1],
                      *[str(row.values.get(f, "-")) for f in fields],
                      f"{row.params / 1e6:.4g}", f"{row.gmacs:.4g}", f"{row.best:.2f}",
                      str(row.steps), row.status])
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
            for cells in [header, ["-" * w for w in widths], *lines]]
    return "\n".join(text)


def write_csv(rows: list[Row], path: str | Path, fields: list[str], metric: str) -> None:
    """One row per trial: varied values, params, GMACs, best metric, steps run, stop reason."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["trial", "run_id", *fields, "params", "gmacs", f"best_{metric}",
                         "steps", "stop_reason"])
        for row in rows:
            writer.writerow([row.run_name, row.run_id, *[row.values.get(f, "") for f in fields],
                             int(row.params) if row.params == row.params else "",
                             f"{row.gmacs:.6f}", f"{row.best:.4f}", row.steps, row.status])


def plot_sweep(rows: list[Row], path: str | Path, *, title: str, metric: str) -> None:
    """Figure 1 style: best ``metric`` against GMACs and against params (M), one labeled
    point per trial; early-stopped trials hollow, failed ones left out."""
    import matplotlib  # ~0.5 s with pyplot; the plot alone needs it, headless (Agg) first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.best == r.best and r.status != "failed"]
    figure, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for axis, (xlabel, x_of) in zip(axes, [("GMACs per image", lambda r: r.gmacs),
                                           ("parameters (M)", lambda r: r.params / 1e6)]):
        for stopped in (False, True):
            group = [r for r in shown if (r.status == "early-stopped") == stopped]
            if not group:
                continue
            axis.scatter([x_of(r) for r in group], [r.best for r in group], s=60,
                         facecolors="none" if stopped else "tab:blue", edgecolors="tab:blue",
                         label="early-stopped (ASHA)" if stopped else "completed")
        for r in shown:
            axis.annotate(r.label(), (x_of(r), r.best), textcoords="offset points",
                          xytext=(5, 4), fontsize=8)
        axis.set_xlabel(xlabel)
        axis.margins(x=0.3, y=0.1)  # room for the labels right of the points
        axis.xaxis.set_major_locator(plt.MaxNLocator(5))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"best {metric}")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    figure.suptitle(f"sweep {title}: best {metric} vs cost ({len(shown)} trials)")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


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
    """The results table from MLflow (best first) and where the plot is."""
    client = mlflow_client(tracking_uri)
    parent = find_parent(client, name)
    fields = json.loads(parent.data.tags.get(SWEEP_FIELDS_TAG, "[]"))
    params = parent.data.params
    rows = sweep_rows(client, parent.info.run_id)
    plot = f"{parent.info.artifact_uri.rstrip('/')}/{PLOT_NAME}"
    if plot.startswith("file://"):
        plot = plot[len("file://"):]
    return (f"sweep {name}: {len(rows)} trials, parent run {parent.info.run_id} "
            f"({parent.info.status})\n"
            f"{format_table(rows, fields, params.get('tune.metric', 'val/top1'), params.get('tune.mode', 'max'))}\n"
            f"plot: {plot}")


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


def open_child(config: Config, *, sweep: str, experiment: str, parent_id: str, trial_id: str,
               values: dict[str, Any]) -> str:
    """The trial's child run (created once; a resumed trial finds it by its run name), with
    the trial's values and its model's parameters and GMACs."""
    client = mlflow_client(config.run.tracking_uri)
    found = find_run(client, experiment, RUN_NAME_TAG, config.run.name)
    if found is not None:
        return found.info.run_id
    child = client.create_run(experiment, run_name=config.run.name, tags={
        "mlflow.parentRunId": parent_id, RUN_NAME_TAG: config.run.name,
        SWEEP_TAG: f"{sweep}/trial", TRIAL_ID_TAG: trial_id,
        TRIAL_VALUES_TAG: json.dumps(flat_values(values)), STATUS_TAG: "running"})
    params, gmacs = model_cost(config)
    client.log_metric(child.info.run_id, "model/params", params, step=0)
    client.log_metric(child.info.run_id, "model/gmacs", gmacs, step=0)
    return child.info.run_id


def close_child(tracking_uri: str, experiment: str, trial_id: str, *, failed: bool) -> bool:
    """Close a trial's child run with how the trial ended; True when its worker had finished
    it (the schedule's end), False when Tune stopped the trial early or it failed."""
    client = mlflow_client(tracking_uri)
    child = find_run(client, experiment, TRIAL_ID_TAG, trial_id)
    finished = child is not None and child.info.status == "FINISHED" and not failed
    if child is None:
        return finished
    if failed:
        status, reason = "FAILED", "failed"
    else:  # the worker closes its run FINISHED at the end of the schedule
        status, reason = ("FINISHED", "completed") if finished else ("KILLED", "early-stopped")
    client.set_tag(child.info.run_id, STATUS_TAG, reason)
    if child.info.status != status:  # a completed run was closed by its worker
        client.set_terminated(child.info.run_id, status=status)
    return finished


def finish_parent(config: Config, parent_id: str) -> tuple[list[Row], str]:
    """results.csv and the top-1 vs cost plot on the parent run; returns (rows, table)."""
    client = mlflow_client(config.run.tracking_uri)
    rows = sweep_rows(client, parent_id)
    with tempfile.TemporaryDirectory() as folder:
        write_csv(rows, Path(folder) / CSV_NAME, config.tune.fields(), config.tune.metric)
        plot_sweep(rows, Path(folder) / PLOT_NAME, title=config.tune.name,
                   metric=config.tune.metric)
        client.log_artifact(parent_id, str(Path(folder) / CSV_NAME))
        client.log_artifact(parent_id, str(Path(folder) / PLOT_NAME))
    all_failed = bool(rows) and all(row.status == "failed" for row in rows)
    client.set_terminated(parent_id, status="FAILED" if all_failed else "FINISHED")
    return rows, format_table(rows, config.tune.fields(), config.tune.metric, config.tune.mode)
