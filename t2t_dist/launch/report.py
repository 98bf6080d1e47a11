"""A sweep's results from MLflow: one row per trial, the table, ``results.csv`` and the plot.

    rows = sweep_rows(MlflowClient(uri), parent_run_id)
    print(format_table(rows, fields, "val/top1", "max"))
    plot_sweep(rows, "sweep_top1_vs_cost.png", title="arch-transfer", metric="val/top1")

The plot follows the paper's Figure 1: best top-1 against GMACs and against parameters,
one labeled point per trial, early-stopped trials drawn hollow.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SWEEP_TAG = "t2t_dist.sweep"  # "<name>/parent" or "<name>/trial"
SWEEP_FIELDS_TAG = "t2t_dist.sweep_fields"  # JSON list of the dotted fields the space sets
TRIAL_VALUES_TAG = "t2t_dist.trial_values"  # JSON of one trial's values
STATUS_TAG = "t2t_dist.trial_status"  # running, completed, early-stopped, failed
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
    import matplotlib

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
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
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
