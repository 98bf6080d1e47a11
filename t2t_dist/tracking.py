"""MLflow tracking, written from rank 0 only: ``log(metrics, step)`` and ``close()``.

One MLflow run per training run name: submitting the same ``run.name`` again finds the
run by its ``t2t_dist.run_name`` tag and continues it. Other ranks get a ``NullTracker``.

    tracker = make_tracker(config, tags={"git_commit": "..."})   # rank 0: MlflowTracker
    tracker.log({"train/loss": 2.3}, step=20)
    tracker.log_model(model)                                      # consolidated fp32 weights
    tracker.close("FINISHED")                                     # or "FAILED"
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2t_dist import dist
from t2t_dist.config import Config, flatten, to_dict

RUN_NAME_TAG = "t2t_dist.run_name"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value


def resolve_tracking_uri(configured: str, cwd: str | Path | None = None) -> str:
    """``configured``, else ``$MLFLOW_TRACKING_URI``, else an sqlite file in ``cwd``.

    Relative sqlite paths become absolute, so workers whose working directory differs from
    the driver's (a Ray cluster) still write to the same file.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str((Path(cwd or os.getcwd()) / uri[len(prefix):]).resolve())
    elif "://" not in uri:
        raise ValueError(f"run.tracking_uri={uri!r} is invalid: expected an MLflow tracking URI "
                         f"such as sqlite:///mlflow.db or http://host:5000 (./mlruns is not used)")
    return uri


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of an sqlite store go beside the database (``mlartifacts/``), never to
    ``./mlruns`` of whatever directory a worker runs in; a server decides for itself."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return (Path(tracking_uri[len(prefix):]).parent / "mlartifacts" / experiment).as_uri()


def config_params(config: Config) -> dict[str, str]:
    """The resolved config as flat MLflow params (``optim.lr`` -> ``"0.0005"``)."""
    return {key: str(value)[:MAX_PARAM_LENGTH] for key, value in flatten(to_dict(config)).items()}


class NullTracker:
    """What ranks other than 0 get: the same methods, no side effects."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_model(self, model: nn.Module, name: str = "model") -> None:
        pass

    def log_dict(self, payload: dict[str, Any], artifact_file: str) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker:
    """One MLflow run: params once, metrics per step, system metrics, tags, the final model."""

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str,
                 params: dict[str, str], tags: dict[str, Any] | None = None,
                 system_metrics: bool = True) -> None:
        import mlflow

        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        found = mlflow.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else mlflow.create_experiment(
            experiment, artifact_location=artifact_location(tracking_uri, experiment))
        existing = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list",
                                      filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
        if system_metrics:
            mlflow.set_system_metrics_sampling_interval(5)
        run_id = existing[0].info.run_id if existing else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                                    experiment_id=experiment_id,
                                    log_system_metrics=system_metrics)
        self.run_id = self.run.info.run_id
        self.resumed = run_id is not None
        logged = mlflow.get_run(self.run_id).data.params
        # MLflow params are immutable: a resubmission keeps the first values and records
        # what changed as tags (e.g. run.max_steps raised to continue training).
        fresh = {k: v for k, v in params.items() if k not in logged}
        changed = {f"changed_param.{k}": v for k, v in params.items()
                   if k in logged and logged[k] != v}
        if fresh:
            mlflow.log_params(fresh)
        self.set_tags({RUN_NAME_TAG: run_name, **(tags or {}), **changed})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_model(self, model: nn.Module, name: str = "model") -> None:
        """Log ``model`` (plain fp32 PyTorch, CPU) as an MLflow model named ``name``.

        Pickled, not ``pt2``: tracing needs an input example and gains nothing for weights
        that are loaded back into ``t2t_dist.models``. Requirements are given, not inferred
        (inference loads the model in a subprocess: seconds per call).
        """
        torch_version = torch.__version__.split("+")[0]
        self._mlflow.pytorch.log_model(model.cpu().float().eval(), name=name,
                                       serialization_format="pickle",
                                       pip_requirements=[f"torch=={torch_version}"])

    def log_dict(self, payload: dict[str, Any], artifact_file: str) -> None:
        """``payload`` as a JSON/YAML artifact (by the file's extension) of this run."""
        self._mlflow.log_dict(payload, artifact_file)

    def close(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


def make_tracker(config: Config, tags: dict[str, Any] | None = None) -> MlflowTracker | NullTracker:
    """An MLflow tracker on rank 0, a ``NullTracker`` elsewhere."""
    if not dist.is_main():
        return NullTracker()
    tracker = MlflowTracker(tracking_uri=resolve_tracking_uri(config.run.tracking_uri),
                            experiment=config.run.experiment, run_name=config.run.name,
                            params=config_params(config), tags=tags)
    # The resolved config beside the params: what `load_config` reads back, for s3 runs too.
    tracker.log_dict(to_dict(config), "config.yaml")
    return tracker
