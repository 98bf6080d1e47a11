"""MLflow tracking, written from rank 0 only: ``log(metrics, step)`` and ``close()``.

One MLflow run per training run name: submitting the same ``run.name`` again finds the
run by its ``t2t_dist.run_name`` tag and continues it. Other ranks get a ``NullTracker``.

    open_experiment(tracking_uri, "t2t-dist")                     # the driver, before Ray
    tracker = make_tracker(config, tags=run_tags)                 # rank 0: MlflowTracker
    tracker.log({"train/loss": 2.3}, step=20)
    tracker.log_model(model, step=230, example=images)            # fp32 weights, once
    tracker.close("FINISHED")                                     # or "FAILED"

What a run records: MLflow's own source tags (job script, git commit, branch, repository,
user; given by the driver, where the checkout is), the resolved config as params (the
architecture as built, its parameter count and GMACs; no section the job does not use), the
training and validation shards as dataset inputs (digests and counts from their manifests),
metrics by step, and each final model once, with a signature and an input example, at the
step it was trained to: MLflow links a model to the run's metrics of its step, so the final
validation numbers are the model's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from t2t_dist import dist
from t2t_dist.config import Config, ConfigError, flatten, run_dir, to_dict
from t2t_dist.config.model import ARCHITECTURE_OVERRIDES
from t2t_dist.data import describe_shards
from t2t_dist.models import T2TViT, count_macs, count_params, resolve

RUN_NAME_TAG = "t2t_dist.run_name"
SOURCE_MODEL_TAG = "t2t_dist.source_model_id"  # the MLflow model a fine-tuning run started from
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value
DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as a description
EXPERIMENT_DESCRIPTION = (
    "T2T-ViT runs of t2t-dist (Ray Train + DeepSpeed). One MLflow run per `run.name`: running "
    "the same name again resumes its checkpoints and continues its run. Params: the resolved "
    "config and the architecture as built (`model.params`, `model.gmacs`). Datasets: the "
    "training and validation shards (digests from their manifests). Models: the final weights "
    "(`model`, and `model_ema` with an EMA), linked to their validation metrics. Evaluation "
    "runs are named `eval-<source>-<time>`.")


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


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of an sqlite store go beside the database (``mlartifacts/``), never to
    ``./mlruns`` of whatever directory a process runs in; a server decides for itself."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return (Path(tracking_uri[len(prefix):]).parent / "mlartifacts").as_uri()


def artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Where an experiment's artifacts go: ``mlartifacts/<experiment>`` beside an sqlite store."""
    root = artifact_root(tracking_uri)
    return f"{root}/{experiment}" if root else None


def init_store(tracking_uri: str) -> None:
    """Create a missing sqlite store, its ``Default`` experiment's artifacts beside it.

    MLflow creates a store on first use and points ``Default`` at ``./mlruns`` of the process
    that got there first: a Ray worker's session folder when that is rank 0. The driver gets
    there first, here.
    """
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or Path(tracking_uri[len(prefix):]).exists():
        return
    # mlflow (~1 s): the store class MLflow's own client builds for sqlite URIs.
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    Path(tracking_uri[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
    SqlAlchemyStore(tracking_uri, artifact_root(tracking_uri))


def mlflow_client(tracking_uri: str):
    """An ``MlflowClient`` on ``tracking_uri``."""
    import mlflow  # ~1 s: only where MLflow is written or read (rank 0, the driver, the CLI)

    return mlflow.MlflowClient(tracking_uri)


def experiment_id(tracking_uri: str, experiment: str) -> str:
    """The id of the experiment named ``experiment``, created when missing (its artifacts
    beside an sqlite store: ``artifact_location``; its description: what its runs hold)."""
    client = mlflow_client(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found:
        if DESCRIPTION_TAG not in found.tags:
            client.set_experiment_tag(found.experiment_id, DESCRIPTION_TAG, EXPERIMENT_DESCRIPTION)
        return found.experiment_id
    return client.create_experiment(experiment, artifact_location=artifact_location(
        tracking_uri, experiment), tags={DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION})


def open_experiment(tracking_uri: str, experiment: str) -> str:
    """What the driver does before any worker: the store (``init_store``) and the experiment
    (``experiment_id``); returns its id."""
    init_store(tracking_uri)
    return experiment_id(tracking_uri, experiment)


def find_run(client, experiment_id: str, tag: str, value: str):
    """The newest run of the experiment whose tag ``tag`` is ``value``; None when none is."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def config_params(config: Config) -> dict[str, str]:
    """The resolved config as flat MLflow params (``optim.lr`` -> ``"0.0005"``), with the
    architecture as built (the variant's depth, width, heads, tokenizer and block where the
    config leaves its 0 / "" placeholders), its parameter count and GMACs per image at the
    run's size; the ``tune`` section only for a sweep's trials (it holds a search space)."""
    flat = flatten(to_dict(config))
    if not config.tune.space:
        flat = {key: value for key, value in flat.items() if not key.startswith("tune.")}
    built = resolve(config.model)
    for name in ARCHITECTURE_OVERRIDES:
        flat[f"model.{name}"] = getattr(built, name)
    with torch.device("meta"):  # counted without memory or arithmetic
        model = T2TViT(built)
    flat["model.params"] = count_params(model)[0]
    flat["model.gmacs"] = round(count_macs(model, config.model.img_size) / 1e9, 4)
    return {key: str(value)[:MAX_PARAM_LENGTH] for key, value in flat.items()}


def dataset_inputs(config: Config, *, training: bool = True) -> list[dict[str, Any]]:
    """The run's shards as ``describe_shards`` gives them (from their manifests, no shard
    read), each with its MLflow context: training and validation, or (``training=False``,
    an evaluation run) the validation shards as "evaluation"."""
    if not training:
        return [{**describe_shards(config.data.val_urls), "context": "evaluation"}]
    return [{**describe_shards(config.data.train_urls), "context": "training"},
            {**describe_shards(config.data.val_urls), "context": "validation"}]


def _dataset_input(description: dict[str, Any]):
    """An MLflow dataset input for shards ``dataset_inputs`` describes: the pattern as its
    source, the manifests' digest, the counts as its profile, the context as a tag."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.entities import Dataset, DatasetInput, InputTag

    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(description["source"])
        source_type, source_json = source._get_source_type(), source.to_json()
    except Exception:  # a scheme MLflow has no source type for: the pattern as it is
        source_type, source_json = "external", json.dumps({"uri": description["source"]})
    profile = {key: description[key] for key in ("num_samples", "num_classes", "num_shards")}
    dataset = Dataset(name=description["name"], digest=description["digest"],
                      source_type=source_type, source=source_json, profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", description["context"])])


def _last_steps(client, run_id: str, metrics: dict[str, float]) -> dict[str, int]:
    """The last step the server holds for each of the run's metrics (MLflow's own ``system/``
    metrics aside)."""
    return {key: max(m.step for m in client.get_metric_history(run_id, key))
            for key in metrics if not key.startswith("system/")}


class NullTracker:
    """What ranks other than 0 get: the same methods, no side effects."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_model(self, model: nn.Module, name: str = "model", **kwargs: Any) -> None:
        pass

    def log_dict(self, payload: dict[str, Any], artifact_file: str) -> None:
        pass

    def close(self, status: str = "FINISHED") -> None:
        pass


# A tracking server that is down must cost training seconds, not minutes: MLflow's HTTP
# client retries 7 times with exponential backoff (~2 min per call) by default. The tracker
# buffers and retries on its own schedule instead. A user's own setting wins.
FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def fail_fast() -> None:
    """MLflow calls of this process fail at once when the server is unreachable
    (``FAST_FAIL_ENV``, unless set): the tracker, and the driver before and after a run."""
    for name, value in FAST_FAIL_ENV.items():
        os.environ.setdefault(name, value)


def _warn(line: str) -> None:
    """One warning line for the user, marked as ours (``dist.CONSOLE_MARK``); the tracker runs
    on rank 0 only, so it prints whatever its rank says."""
    sys.stderr.write(f"{dist.CONSOLE_MARK}WARNING: {line}\n")
    sys.stderr.flush()


class MlflowTracker:
    """One MLflow run: params once, metrics per step, system metrics, tags, the final model.

    The run is found by name, so a resubmitted or restarted job continues it; metric steps at
    or below the last step already logged for a key are dropped (a restart replays the steps
    after its checkpoint), so no step appears twice. After an outage the last steps are read
    from the server again before anything is resent: a call whose answer was lost may have
    been stored.

    An unreachable tracking server (at start or mid-run) never stops training: one warning,
    metrics, tags and dict artifacts are buffered and sent, in order, once a retry (every
    ``retry_every_s``, on the next ``log``) reaches the server; what is still unsent at
    ``close`` is written to ``offline_path`` (JSON lines), and the warning says where.
    """

    def __init__(self, *, tracking_uri: str, experiment: str, run_name: str,
                 params: dict[str, str], tags: dict[str, Any] | None = None,
                 datasets: list[dict[str, Any]] = (), system_metrics: bool = True,
                 retry_every_s: float = 30.0, offline_path: str | Path | None = None) -> None:
        import mlflow  # ~1 s: rank 0 only; the other ranks' NullTracker never needs it

        fail_fast()
        self._mlflow = mlflow
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self._params, self._system_metrics, self.retry_every_s = params, system_metrics, retry_every_s
        self._datasets = list(datasets)  # dataset_inputs(config): logged once, on the new run
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
        """Find or create the experiment and the run (by name); log params, and for a new run
        its dataset inputs and the model it started from; note the last logged step of every
        metric."""
        mlflow = self._mlflow
        mlflow.set_tracking_uri(self.tracking_uri)
        client = mlflow.MlflowClient(self.tracking_uri)
        init_store(self.tracking_uri)  # the driver made it, unless it could not reach MLflow
        experiment = experiment_id(self.tracking_uri, self.experiment)
        existing = find_run(client, experiment, RUN_NAME_TAG, self.run_name)
        if self._system_metrics:
            mlflow.set_system_metrics_sampling_interval(5)
        run_id = existing.info.run_id if existing else None
        # A new run gets its tags at creation, so MLflow's own guesses (the source: Ray's
        # default_worker.py) never show.
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else self.run_name,
                               experiment_id=experiment, log_system_metrics=self._system_metrics,
                               tags=None if run_id else dict(self._pending_tags))
        found = mlflow.get_run(run.info.run_id)
        data = found.data
        self._last_step = _last_steps(client, run.info.run_id, data.metrics)
        # MLflow params are immutable: a resubmission keeps the first values and records
        # what changed as tags (e.g. run.max_steps raised to continue training).
        logged = data.params
        fresh = {k: v for k, v in self._params.items() if k not in logged}
        changed = {f"changed_param.{k}": v for k, v in self._params.items()
                   if k in logged and logged[k] != v}
        if fresh:
            mlflow.log_params(fresh)
        inputs = found.inputs
        if self._datasets and not (inputs and inputs.dataset_inputs):
            client.log_inputs(run.info.run_id,
                              datasets=[_dataset_input(each) for each in self._datasets])
        source_model = self._pending_tags.get(SOURCE_MODEL_TAG) or data.tags.get(SOURCE_MODEL_TAG)
        if source_model and not (inputs and inputs.model_inputs):
            from mlflow.entities import LoggedModelInput  # mlflow: imported in __init__ already

            client.log_inputs(run.info.run_id, models=[LoggedModelInput(source_model)])
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
            elif self.down_since is not None:
                # A call that failed may have reached the server all the same (its answer lost
                # to the outage, or past our timeout): what it holds now decides what is resent.
                client = self._mlflow.MlflowClient(self.tracking_uri)
                self._last_step = _last_steps(client, self.run_id,
                                              client.get_run(self.run_id).data.metrics)
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

    def log_model(self, model: nn.Module, name: str = "model", *, step: int = 0,
                  example: np.ndarray | None = None) -> None:
        """Log ``model`` (plain fp32 PyTorch, CPU) as the MLflow model ``name`` of this run at
        ``step``, once: a model of that name the run holds at that step already (a rerun that
        trained no further) is not logged again. MLflow links it to the run's metrics of
        ``step`` (the final validation numbers, with their dataset). With the server
        unreachable, saved beside ``offline_path`` instead (the warning says where).

        ``example``: a batch of model inputs (B, 3, H, W), logged as the input example, with a
        signature inferred from it and the model's output. The model's params: the run's
        ``model.*`` params (the architecture as built).

        Pickled, not ``pt2``: tracing gains nothing for weights that are loaded back into
        ``t2t_dist.models``. Requirements are given, not inferred (inference loads the model
        in a subprocess: seconds per call).
        """
        torch_version = torch.__version__.split("+")[0]
        model = model.cpu().float().eval()
        options: dict[str, Any] = {"serialization_format": "pickle",
                                   "pip_requirements": [f"torch=={torch_version}"]}
        if example is not None:
            from mlflow.models import infer_signature  # mlflow: imported in __init__ already

            example = np.asarray(example, dtype=np.float32)
            with torch.no_grad():
                output = model(torch.from_numpy(example)).numpy()
            options.update(signature=infer_signature(example, output), input_example=example)
        if self.flush():
            try:
                if not self._holds_model(name, step):
                    architecture = {k: v for k, v in self._params.items() if k.startswith("model.")}
                    self._mlflow.pytorch.log_model(model, name=name, step=step,
                                                   params=architecture, **options)
                return
            except Exception as error:
                self._went_down(error)
        path = self.offline_path.with_name(f"{self.offline_path.stem}-{name}")
        shutil.rmtree(path, ignore_errors=True)
        self._mlflow.pytorch.save_model(model, str(path), **options)
        _warn(f"MLflow at {self.tracking_uri} is unreachable: model {name!r} saved to {path}")

    def _holds_model(self, name: str, step: int) -> bool:
        """Whether this run logged a model named ``name`` at ``step``."""
        client = self._mlflow.MlflowClient(self.tracking_uri)
        outputs = client.get_run(self.run_id).outputs
        return any(output.step == step and client.get_logged_model(output.model_id).name == name
                   for output in (outputs.model_outputs if outputs else []))

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


def make_tracker(config: Config, tags: dict[str, Any] | None = None, *,
                 training: bool = True) -> MlflowTracker | NullTracker:
    """An MLflow tracker on rank 0, a ``NullTracker`` elsewhere; ``training=False`` for an
    evaluation run (its dataset: the validation shards)."""
    if not dist.is_main():
        return NullTracker()
    # Metrics a tracking server never got land beside the checkpoints (a local temp file
    # when those are in object storage).
    local = "://" not in config.run.storage_path
    offline = Path(run_dir(config)) / "mlflow-offline.jsonl" if local else None
    tracker = MlflowTracker(tracking_uri=resolve_tracking_uri(config.run.tracking_uri),
                            experiment=config.run.experiment, run_name=config.run.name,
                            params=config_params(config), tags=tags,
                            datasets=dataset_inputs(config, training=training),
                            offline_path=offline)
    # The resolved config beside the params: what `load_config` reads back, for s3 runs too.
    tracker.log_dict(to_dict(config), "config.yaml")
    return tracker
