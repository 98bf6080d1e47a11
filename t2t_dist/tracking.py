"""MLflow tracking, written from rank 0 only: ``log(metrics, step)`` and ``close()``.

One MLflow run per training run name: submitting the same ``run.name`` again finds the
run by its ``t2t_dist.run_name`` tag and continues it. Other ranks get a ``NullTracker``.

    tracker = make_tracker(config, tags={"git_commit": "..."})   # rank 0: MlflowTracker
    tracker.log({"train/loss": 2.3}, step=20)
    tracker.log_model(model)                                      # consolidated fp32 weights
    tracker.close("FINISHED")                                     # or "FAILED"
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from t2t_dist import dist
from t2t_dist.config import Config, ConfigError, flatten, run_dir, to_dict

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


def redact(uri: str) -> str:
    """``uri`` without a password in it (``http://user:secret@host`` -> ``http://user:***@host``)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def check_credentials(tracking_uri: str) -> None:
    """Fail in one line when an MLflow server refuses this process's credentials
    (``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``MLFLOW_TRACKING_TOKEN``, as MLflow's client
    reads them). A server that does not answer is left to the tracker, which trains on through
    outages. No secret is ever part of the message."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    # mlflow: ~1 s to import, and only an http store needs it here.
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(tracking_uri)
    try:
        response = http_request(creds, "/api/2.0/mlflow/experiments/search", "POST",
                                max_retries=0, timeout=10, raise_on_status=False,
                                json={"max_results": 1})
    except Exception:  # unreachable, TLS, timeouts: an outage, not a configuration error
        return
    if response.status_code not in (401, 403):
        return
    who = (f"user {creds.username!r}" if creds.username else
           "a request without credentials (MLFLOW_TRACKING_USERNAME is unset)")
    need = ("the MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD of a user of that server"
            if response.status_code == 401 else "a user with access to the experiment")
    raise ConfigError(f"run.tracking_uri={redact(tracking_uri)!r} refused {who} "
                      f"(HTTP {response.status_code}): expected {need}")


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Artifacts of an sqlite store go beside the database (``mlartifacts/``), never to
    ``./mlruns`` of whatever directory a worker runs in; a server decides for itself."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return (Path(tracking_uri[len(prefix):]).parent / "mlartifacts" / experiment).as_uri()


def mlflow_client(tracking_uri: str):
    """An ``MlflowClient`` on ``tracking_uri``."""
    import mlflow  # ~1 s: only where MLflow is written or read (rank 0, the driver, the CLI)

    return mlflow.MlflowClient(tracking_uri)


def experiment_id(tracking_uri: str, experiment: str) -> str:
    """The id of the experiment named ``experiment``, created when missing (its artifacts
    beside an sqlite store: ``artifact_location``)."""
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found:
        return found.experiment_id
    return client.create_experiment(experiment, artifact_location=artifact_location(
        tracking_uri, experiment))


def find_run(client, experiment_id: str, tag: str, value: str):
    """The newest run of the experiment whose tag ``tag`` is ``value``; None when none is."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


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


# A tracking server that is down must cost training seconds, not minutes: MLflow's HTTP
# client retries 7 times with exponential backoff (~2 min per call) by default. The tracker
# buffers and retries on its own schedule instead. A user's own setting wins.
FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _warn(line: str) -> None:
    sys.stderr.write(f"WARNING: {line}\n")
    sys.stderr.flush()


class MlflowTracker:
    """One MLflow run: params once, metrics per step, system metrics, tags, the final model.

    The run is found by name, so a resubmitted or restarted job continues it; metric steps at
    or below the last step already logged for a key are dropped (a restart replays the steps
    after its checkpoint), so no step appears twice.

    An unreachable tracking server (at start or mid-run) never stops training: one warning,
    metrics, tags and dict artifacts are buffered and sent, in order, once a retry (every
    ``retry_every_s``, on the next ``log``) reaches the server; what is still unsent at
    ``close`` is written to ``offline_path`` (JSON lines), and the warning says where.
    """

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str,
                 params: dict[str, str], tags: dict[str, Any] | None = None,
                 system_metrics: bool = True, retry_every_s: float = 30.0,
                 offline_path: str | Path | None = None) -> None:
        import mlflow  # ~1 s: rank 0 only; the other ranks' NullTracker never needs it

        for name, value in FAST_FAIL_ENV.items():
            os.environ.setdefault(name, value)
        self._mlflow = mlflow
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self._params, self._system_metrics, self.retry_every_s = params, system_metrics, retry_every_s
        self.offline_path = Path(offline_path) if offline_path else Path(
            tempfile.gettempdir()) / "t2t-dist-mlflow" / f"{run_name}-{os.getpid()}.jsonl"
        self.run_id: str | None = None
        self.resumed = False
        self.down_since: float | None = None  # monotonic time of the first failed call
        self.outages = 0  # how many times the server was found unreachable (one warning each)
        self._next_try = 0.0
        self._pending: list[tuple[dict[str, float], int]] = []  # (metrics, step), in order
        self._pending_tags: dict[str, str] = {}
        self._pending_dicts: list[tuple[dict[str, Any], str]] = []
        self._last_step: dict[str, int] = {}  # key -> last step the server holds
        self.set_tags({RUN_NAME_TAG: run_name, **(tags or {})})

    # --- connection ---

    def _open(self) -> None:
        """Find or create the experiment and the run (by name); log params; note the last
        logged step of every metric."""
        mlflow = self._mlflow
        mlflow.set_tracking_uri(self.tracking_uri)
        client = mlflow.MlflowClient(self.tracking_uri)
        experiment = experiment_id(self.tracking_uri, self.experiment)
        existing = find_run(client, experiment, RUN_NAME_TAG, self.run_name)
        if self._system_metrics:
            mlflow.set_system_metrics_sampling_interval(5)
        run_id = existing.info.run_id if existing else None
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else self.run_name,
                               experiment_id=experiment, log_system_metrics=self._system_metrics)
        data = mlflow.get_run(run.info.run_id).data
        self._last_step = {key: max(m.step for m in client.get_metric_history(run.info.run_id, key))
                           for key in data.metrics if not key.startswith("system/")}
        # MLflow params are immutable: a resubmission keeps the first values and records
        # what changed as tags (e.g. run.max_steps raised to continue training).
        logged = data.params
        fresh = {k: v for k, v in self._params.items() if k not in logged}
        changed = {f"changed_param.{k}": v for k, v in self._params.items()
                   if k in logged and logged[k] != v}
        if fresh:
            mlflow.log_params(fresh)
        self._pending_tags = {**self._pending_tags, **changed}
        self.run, self.run_id, self.resumed = run, run.info.run_id, run_id is not None

    def _went_down(self, error: BaseException) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            _warn(f"MLflow at {self.tracking_uri} is unreachable ({type(error).__name__}); "
                  f"training goes on, metrics are buffered and sent when it is back (retried "
                  f"every {self.retry_every_s:g} s; unsent at the end: {self.offline_path})")
        self._next_try = time.monotonic() + self.retry_every_s

    def flush(self) -> bool:
        """Send what is buffered (opening the run first if that failed before); True when
        nothing is left. Between retries of an outage it returns at once."""
        if self.down_since is not None and time.monotonic() < self._next_try:
            return False
        try:
            if self.run_id is None:
                self._open()
            while self._pending:
                metrics, step = self._pending[0]
                fresh = {k: v for k, v in metrics.items() if step > self._last_step.get(k, -1)}
                if fresh:
                    self._mlflow.log_metrics(fresh, step=step)
                self._last_step.update(dict.fromkeys(fresh, step))
                self._pending.pop(0)
            if self._pending_tags:
                self._mlflow.set_tags(self._pending_tags)
                self._pending_tags = {}
            while self._pending_dicts:
                self._mlflow.log_dict(*self._pending_dicts[0])
                self._pending_dicts.pop(0)
        except Exception as error:  # connection refused, timeouts, 5xx: all the same here
            self._went_down(error)
            return False
        self.down_since = None
        return True

    # --- the Tracker methods ---

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._pending.append(({k: float(v) for k, v in metrics.items()}, step))
        self.flush()

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._pending_tags.update({k: str(v) for k, v in tags.items()})
        self.flush()

    def log_model(self, model: nn.Module, name: str = "model") -> None:
        """Log ``model`` (plain fp32 PyTorch, CPU) as an MLflow model named ``name``; with the
        server unreachable, saved beside ``offline_path`` instead (the warning says where).

        Pickled, not ``pt2``: tracing needs an input example and gains nothing for weights
        that are loaded back into ``t2t_dist.models``. Requirements are given, not inferred
        (inference loads the model in a subprocess: seconds per call).
        """
        torch_version = torch.__version__.split("+")[0]
        model = model.cpu().float().eval()
        options = {"serialization_format": "pickle", "pip_requirements": [f"torch=={torch_version}"]}
        if self.flush():
            try:
                self._mlflow.pytorch.log_model(model, name=name, **options)
                return
            except Exception as error:
                self._went_down(error)
        path = self.offline_path.with_name(f"{self.offline_path.stem}-{name}")
        shutil.rmtree(path, ignore_errors=True)
        self._mlflow.pytorch.save_model(model, str(path), **options)
        _warn(f"MLflow at {self.tracking_uri} is unreachable: model {name!r} saved to {path}")

    def log_dict(self, payload: dict[str, Any], artifact_file: str) -> None:
        """``payload`` as a JSON/YAML artifact (by the file's extension) of this run."""
        self._pending_dicts.append((payload, artifact_file))
        self.flush()

    def close(self, status: str = "FINISHED") -> None:
        """Send what is buffered (one last try) and end the run with ``status``; what the
        server never got is written to ``offline_path``."""
        self._next_try = 0.0
        if self.flush():
            try:
                self._mlflow.end_run(status=status)
                return
            except Exception as error:
                self._went_down(error)
        elif self.run_id is not None:
            try:  # pops the run off MLflow's active-run stack even when the server is gone
                self._mlflow.end_run(status=status)
            except Exception:
                pass
        self.offline_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.offline_path, "w") as out:
            header = {"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                      "run_name": self.run_name, "run_id": self.run_id, "status": status,
                      "params": self._params if self.run_id is None else {},
                      "tags": self._pending_tags}
            out.write(json.dumps(header) + "\n")
            for metrics, step in self._pending:
                out.write(json.dumps({"step": step, "metrics": metrics}) + "\n")
        _warn(f"MLflow at {self.tracking_uri} stayed unreachable: {len(self._pending)} unsent "
              f"metric steps written to {self.offline_path}")


def make_tracker(config: Config, tags: dict[str, Any] | None = None) -> MlflowTracker | NullTracker:
    """An MLflow tracker on rank 0, a ``NullTracker`` elsewhere."""
    if not dist.is_main():
        return NullTracker()
    # Metrics a tracking server never got land beside the checkpoints (a local temp file
    # when those are in object storage).
    local = "://" not in config.run.storage_path
    offline = Path(run_dir(config)) / "mlflow-offline.jsonl" if local else None
    tracker = MlflowTracker(tracking_uri=resolve_tracking_uri(config.run.tracking_uri),
                            experiment=config.run.experiment, run_name=config.run.name,
                            params=config_params(config), tags=tags, offline_path=offline)
    # The resolved config beside the params: what `load_config` reads back, for s3 runs too.
    tracker.log_dict(to_dict(config), "config.yaml")
    return tracker
