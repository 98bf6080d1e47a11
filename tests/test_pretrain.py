"""The pretraining job end to end on a real local Ray cluster (2 CPU workers, DeepSpeed, MLflow).

Tiny model (t2t_vit_tiny at 32 px) on the digits shards, a few steps per run; one Ray head
for the whole session (``ray_cluster``), this process as the driver.
"""

import math
import os
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from ray_cluster import DRIVER_ENV
from t2t_dist.config import load_config
from t2t_dist.launch import launch, prepare, preflight
from t2t_dist.tracking import RUN_NAME_TAG

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import pretrain  # noqa: E402  (jobs/pretrain.py)


def tiny_config(digits, tmp_path, name, *extra):
    """The test recipe: every augmentation on, EMA on, 2 workers, 16 images per step."""
    return prepare(load_config(overrides=[
        f"data.train_urls={digits['train']}", f"data.val_urls={digits['val']}",
        "model.name=t2t_vit_tiny", "model.compile=false", "model.img_size=32", "model.num_classes=10",
        "data.global_batch=16", "data.eval_batch=100", "data.loader_workers=0",
        "optim.lr=1e-3", "optim.reference_batch=16", "optim.epochs=2", "optim.warmup_epochs=0.1",
        "optim.cooldown_epochs=0", "optim.ema_decay=0.9", "optim.grad_clip=1.0",
        f"run.name={name}", f"run.storage_path={tmp_path}/runs",
        f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "run.log_every=1",
        "run.log_model=false", "run.max_failures=0",
        "scaling.num_workers=2", *extra]))


@pytest.fixture(scope="module")
def driver(ray_cluster):
    """This test process as the Ray driver of the session's cluster."""
    import ray

    os.environ.update(DRIVER_ENV)
    ray.init(address=ray_cluster.address, logging_level="WARNING")
    yield ray_cluster
    ray.shutdown()


def mlflow_run(config):
    client = MlflowClient(config.run.tracking_uri)
    experiment = client.get_experiment_by_name(config.run.experiment)
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{RUN_NAME_TAG}` = '{config.run.name}'")
    assert len(runs) == 1, "one MLflow run per run name"
    return client, runs[0]


def losses(client, run_id):
    return {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}


# Bad input: one line, before any Ray resources are taken, run directory left alone.

@pytest.mark.parametrize("argv, message", [
    (["--model", "t2t_vit_99"], "model.name='t2t_vit_99' is invalid: did you mean t2t_vit_19 or "
                                "t2t_vit_7 or t2t_vit_t_19? expected one of t2t_vit_7, t2t_vit_10"),
    (["--set", "engine.zero_stage=5"], "engine.zero_stage=5 is invalid: expected one of 0, 1, 2, 3"),
    (["--set", "optim.lr"], "override 'optim.lr' is invalid: expected section.field=value"),
    (["--set", "data.train_urls=/nowhere/x-{0000..0001}.tar"], "data.train_urls='/nowhere/x-"),
    (["--config", "jobs/configs/nope.yaml"], "config file 'jobs/configs/nope.yaml' does not exist"),
    (["--set", "model.num_classes=1000"], "model.num_classes=1000 is invalid: expected 10"),
])
def test_bad_input_fails_in_one_line_before_ray(argv, message, tmp_path, capsys, monkeypatch,
                                                digits_shards):
    import ray

    connected = ray.is_initialized()  # these tests come first in the file: normally False
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "keep.txt").write_text("earlier run")
    monkeypatch.chdir(tmp_path)
    base = ["--set", f"data.train_urls={digits_shards['train']}",
            "--set", f"data.val_urls={digits_shards['val']}", "--set", "run.storage_path=runs"]
    config_file = [] if "--config" in argv else ["--config", str(pretrain.DEFAULT_CONFIG)]
    if argv[0] == "--config":
        monkeypatch.chdir(Path(pretrain.__file__).parents[1])
    assert pretrain.main(config_file + base + argv) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert (run_dir / "keep.txt").read_text() == "earlier run"
    assert ray.is_initialized() == connected  # no Ray started (or connected) for bad input


def test_unreadable_s3_shards_fail_in_preflight(digits_shards, tmp_path, monkeypatch):
    from t2t_dist import storage
    from t2t_dist.config import ConfigError

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(storage, "_SESSION", None)  # forget credentials an earlier test resolved
    config = tiny_config(digits_shards, tmp_path, "s3",
                         "data.train_urls=s3://no-bucket/train/digits-train-{0000..0001}.tar")
    with pytest.raises(ConfigError, match=r"data.train_urls='s3://no-bucket/.*' cannot be read: "
                                          r"NoCredentialsError") as error:
        preflight(config)
    assert "\n" not in str(error.value)


@pytest.mark.ray
@pytest.mark.slow
def test_zero2_bf16_checkpoint_mlflow_and_model(driver, digits_shards, tmp_path):
    config = tiny_config(digits_shards, tmp_path, "zero2", "engine.zero_stage=2",
                         "engine.precision=bf16", "run.max_steps=4", "run.checkpoint_every=2",
                         "run.log_model=true")
    started = time.perf_counter()
    result = launch(config)
    print(f"launch took {time.perf_counter() - started:.1f}s")
    assert result.metrics["step"] == 4 and math.isfinite(result.metrics["train/loss"])
    assert 0 <= result.metrics["val/top1"] <= 100 and "val_ema/top1" in result.metrics

    # The checkpoint holds every rank's ZeRO shards and client state together.
    checkpoint = Path(result.checkpoint.path)
    assert checkpoint.name == "checkpoint_step_00000004"
    for rank in (0, 1):
        assert len(list((checkpoint / "state").glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))) == 1
        client_state = torch.load(checkpoint / "client" / f"rank_{rank:05d}.pt", weights_only=False)
        assert client_state["step"] == 4 and client_state["loader"]["position"] == 4 * 16
    assert (checkpoint / "state" / "mp_rank_00_model_states.pt").is_file()
    assert (checkpoint / "ema.pt").is_file()
    assert sorted(p.name for p in checkpoint.parent.glob("checkpoint_step_*")) == [
        "checkpoint_step_00000002", "checkpoint_step_00000004"]  # keep_checkpoints=2
    assert load_config(checkpoint.parent / "t2t_config.yaml") == config

    client, run = mlflow_run(config)
    assert run.data.params["engine.zero_stage"] == "2" and run.data.params["optim.lr"] == "0.001"
    assert sorted(losses(client, run.info.run_id)) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in losses(client, run.info.run_id).values())
    for key in ("train/lr", "train/images_per_s", "train/images_per_s_per_worker", "val/top1",
                "val/top5", "val_ema/top1", "data/skipped_corrupt_jpeg"):
        assert key in run.data.metrics, key
    assert run.data.tags["checkpoint_location"] == f"{tmp_path}/runs/zero2"
    assert run.data.tags["ray_job_id"] and run.data.tags["git_commit"]
    assert run.info.status == "FINISHED"
    logged = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="config.yaml",
                                                 tracking_uri=config.run.tracking_uri,
                                                 dst_path=str(tmp_path / "logged"))
    assert load_config(logged) == config

    # The MLflow model holds the consolidated fp32 master weights, not bf16 or shards.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    mlflow.set_tracking_uri(config.run.tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    master = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="state")
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 or not tensor.is_floating_point()
        if name in master:
            torch.testing.assert_close(tensor, master[name].float(), rtol=0, atol=0)
    ema = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model_ema")
    saved_ema = torch.load(checkpoint / "ema.pt", weights_only=False)["shadow"]
    torch.testing.assert_close(ema.state_dict()["head.weight"], saved_ema["head.weight"])


@pytest.mark.ray
@pytest.mark.slow
def test_zero3_bf16_shards_every_rank(driver, digits_shards, tmp_path):
    config = tiny_config(digits_shards, tmp_path, "zero3", "engine.zero_stage=3",
                         "engine.precision=bf16", "run.max_steps=3")
    result = launch(config)
    assert result.metrics["step"] == 3 and math.isfinite(result.metrics["train/loss"])
    state = Path(result.checkpoint.path) / "state"
    for rank in (0, 1):  # stage 3 partitions the parameters too
        assert (state / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").is_file()
        assert len(list(state.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))) == 1
    client, run = mlflow_run(config)
    assert all(math.isfinite(v) for v in losses(client, run.info.run_id).values())


@pytest.mark.ray
@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_losses(driver, digits_shards, tmp_path):
    """Golden losses: 6 steps straight vs 3 steps, stop, resubmit the same name, on to 6."""
    common = ("engine.zero_stage=2", "engine.precision=fp32", "run.checkpoint_every=3")
    straight = tiny_config(digits_shards, tmp_path, "golden-straight", *common, "run.max_steps=6")
    launch(straight)
    first = tiny_config(digits_shards, tmp_path, "golden-resumed", *common, "run.max_steps=3")
    launch(first)
    second = tiny_config(digits_shards, tmp_path, "golden-resumed", *common, "run.max_steps=6")
    result = launch(second)
    assert result.metrics["step"] == 6

    client, run_straight = mlflow_run(straight)
    _, run_resumed = mlflow_run(second)  # the resubmission continued the same MLflow run
    expected, got = losses(client, run_straight.info.run_id), losses(client, run_resumed.info.run_id)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=0), step
    assert run_resumed.data.metrics["val/loss"] == pytest.approx(
        run_straight.data.metrics["val/loss"], abs=1e-6)


def test_prepare_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = prepare(load_config(overrides=["data.train_urls=demo/t-{0000..0001}.tar",
                                            "data.val_urls=s3://b/v-{0000..0001}.tar"]), tmp_path)
    assert config.data.train_urls == f"{tmp_path}/demo/t-{{0000..0001}}.tar"
    assert config.data.val_urls == "s3://b/v-{0000..0001}.tar"
    assert config.run.storage_path == f"{tmp_path}/runs"
    assert config.run.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
