"""MLflow tracker on a real sqlite store: params once, metrics by step, tags, resume, model."""

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from t2t_dist import dist
from t2t_dist.config import Config, load_config
from t2t_dist.tracking import (RUN_NAME_TAG, MlflowTracker, NullTracker, config_params,
                               make_tracker, resolve_tracking_uri)


@pytest.fixture
def tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def _tracker(uri: str, config: Config, **tags) -> MlflowTracker:
    return MlflowTracker(tracking_uri=uri, experiment="tests", run_name=config.run.name,
                         params=config_params(config), tags=tags, system_metrics=False)


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("", tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("sqlite:///sub/x.db", tmp_path) == f"sqlite:///{tmp_path.resolve()}/sub/x.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri("") == "http://from-env:5000"
    with pytest.raises(ValueError, match="run.tracking_uri='./mlruns' is invalid"):
        resolve_tracking_uri("./mlruns")


def test_params_metrics_tags_and_resume(tracking_uri):
    config = load_config(overrides=["run.name=tracked", "optim.lr=1e-3"])
    tracker = _tracker(tracking_uri, config, git_commit="abc123")
    tracker.log({"train/loss": 2.5, "train/lr": 1e-4}, step=10)
    tracker.log({"train/loss": 2.0}, step=20)
    run_id = tracker.run_id
    tracker.close()

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    assert run.data.params["optim.lr"] == "0.001"
    assert run.data.params["data.mean"] == "[0.485, 0.456, 0.406]"
    assert len(run.data.params) == len(config_params(config))
    assert run.data.tags[RUN_NAME_TAG] == "tracked" and run.data.tags["git_commit"] == "abc123"
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(10, 2.5), (20, 2.0)]
    assert run.info.status == "FINISHED"

    # The same run name continues the same run; a changed param is kept and noted as a tag.
    again = _tracker(tracking_uri, load_config(overrides=["run.name=tracked", "optim.lr=1e-3",
                                                          "run.max_steps=40"]))
    assert again.run_id == run_id and again.resumed
    again.log({"train/loss": 1.5}, step=30)
    again.close()
    run = client.get_run(run_id)
    assert run.data.params["run.max_steps"] == "0"
    assert run.data.tags["changed_param.run.max_steps"] == "40"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [10, 20, 30]

    other = _tracker(tracking_uri, load_config(overrides=["run.name=another"]))
    assert other.run_id != run_id
    other.close(status="FAILED")
    assert client.get_run(other.run_id).info.status == "FAILED"


def test_log_model_round_trips_weights(tracking_uri, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    tracker = _tracker(tracking_uri, load_config(overrides=["run.name=with-model"]))
    tracker.log_model(model, name="model")
    run_id = tracker.run_id
    tracker.close()
    mlflow.set_tracking_uri(tracking_uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    artifacts = MlflowClient(tracking_uri).get_run(run_id).info.artifact_uri
    assert artifacts.startswith(f"file://{tmp_path}/mlartifacts/tests/")  # beside the db
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)


def test_other_ranks_get_a_null_tracker(monkeypatch, tracking_uri):
    monkeypatch.setattr(dist, "_initialized", lambda: False)  # other tests may hold a gloo group
    monkeypatch.setenv("RANK", "1")
    tracker = make_tracker(load_config(overrides=[f"run.tracking_uri={tracking_uri}"]))
    assert isinstance(tracker, NullTracker)
    tracker.log({"x": 1.0}, step=1)
    tracker.close()
    assert MlflowClient(tracking_uri).search_experiments(filter_string="name = 't2t-dist'") == []
