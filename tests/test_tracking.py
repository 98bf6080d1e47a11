"""MLflow tracker on a real sqlite store: params once, metrics by step, tags, resume, model."""

import json

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from t2t_dist import dist
from t2t_dist.config import Config, load_config
from t2t_dist.data import describe_shards
from t2t_dist.models import create_model, resolve
from t2t_dist.tracking import (RUN_NAME_TAG, MlflowTracker, NullTracker, config_params,
                               dataset_inputs, make_tracker, open_experiment,
                               resolve_tracking_uri)


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


def test_a_run_explains_itself(tmp_path, digits_shards):
    """What the MLflow UI shows: source tags set at creation, the shards as dataset inputs
    (once), the architecture as built, no sweep params, each model once with a signature and
    linked to the metrics of its step; the experiment's description; ``Default``'s artifacts
    beside the store."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    experiment = open_experiment(uri, "explained")
    client = MlflowClient(uri)
    assert client.get_experiment("0").artifact_location == f"file://{tmp_path}/mlartifacts/0"
    assert "One MLflow run per `run.name`" in client.get_experiment(experiment).tags[
        "mlflow.note.content"]
    config = load_config(overrides=[
        f"data.train_urls={digits_shards['train']}", f"data.val_urls={digits_shards['val']}",
        "model.name=t2t_vit_tiny", "model.img_size=32", "model.num_classes=10",
        "run.name=explained"])
    source = {"mlflow.source.name": "jobs/pretrain.py", "mlflow.source.git.commit": "abc123"}

    def tracker():
        return MlflowTracker(tracking_uri=uri, experiment="explained", run_name="explained",
                             params=config_params(config), tags=source,
                             datasets=dataset_inputs(config), system_metrics=False)

    first = tracker()
    first.log({"train/loss": 2.0, "train/lr": 1e-3}, step=2)
    first.log({"val/top1": 50.0, "val/loss": 1.5}, step=2)
    model = create_model("t2t_vit_tiny", img_size=32, num_classes=10)
    example = torch.zeros(2, 3, 32, 32).numpy()
    first.log_model(model, name="model", step=2, example=example)
    first.close()
    again = tracker()  # a rerun of the finished run: nothing logged twice
    again.log_model(model, name="model", step=2, example=example)
    again.close()

    run = client.get_run(first.run_id)
    assert run.data.tags["mlflow.source.name"] == "jobs/pretrain.py"  # not pytest's, at creation
    assert run.data.tags["mlflow.source.git.commit"] == "abc123"
    built = resolve(config.model)
    params = run.data.params
    assert (params["model.depth"], params["model.embed_dim"], params["model.tokens"]) == (
        str(built.depth), str(built.embed_dim), built.tokens)
    assert int(params["model.params"]) > 0 and float(params["model.gmacs"]) > 0
    assert not [key for key in params if key.startswith("tune.")]
    inputs = run.inputs.dataset_inputs
    assert [(i.dataset.name, i.tags[0].value) for i in inputs] == [
        ("digits-train", "training"), ("digits-val", "validation")]
    assert inputs[0].dataset.digest == describe_shards(digits_shards["train"])["digest"]
    assert json.loads(inputs[1].dataset.profile)["num_samples"] == 299
    [output] = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert (logged.name, output.step) == ("model", 2)
    assert {m.key for m in logged.metrics} >= {"val/top1", "val/loss"}
    info = mlflow.models.get_model_info(f"models:/{output.model_id}")
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 32, 32]
    assert info.saved_input_example_info["type"] == "ndarray"
