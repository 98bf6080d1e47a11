"""The pretraining job end to end on a real local Ray cluster (2 CPU workers, DeepSpeed, MLflow).

Tiny model (t2t_vit_tiny at 32 px) on the digits shards, a few steps per run; one Ray head
for the whole session (``ray_cluster``), this process as the driver.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from t2t_dist.config import load_config
from t2t_dist.data import build_val_loader, normalize
from t2t_dist.launch import launch, prepare
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

BAD_INPUT = [
    (["--model", "t2t_vit_99"], "model.name='t2t_vit_99' is invalid: did you mean t2t_vit_19 or "
                                "t2t_vit_7 or t2t_vit_t_19? expected one of t2t_vit_7, t2t_vit_10"),
    (["--set", "engine.zero_stage=5"], "engine.zero_stage=5 is invalid: expected one of 0, 1, 2, 3"),
    (["--set", "optim.lr"], "override 'optim.lr' is invalid: expected section.field=value"),
    (["--set", "data.train_urls=/nowhere/x-{0000..0001}.tar"], "data.train_urls='/nowhere/x-"),
    (["--config", "jobs/configs/nope.yaml"], "config file 'jobs/configs/nope.yaml' does not exist"),
    (["--set", "model.num_classes=1000"], "model.num_classes=1000 is invalid: expected 10"),
]


def bad_argv(argv, digits):
    base = ["--set", f"data.train_urls={digits['train']}",
            "--set", f"data.val_urls={digits['val']}", "--set", "run.storage_path=runs"]
    config_file = [] if "--config" in argv else ["--config", str(pretrain.DEFAULT_CONFIG)]
    return config_file + base + argv


@pytest.mark.parametrize("argv, message", BAD_INPUT)
def test_bad_input_fails_in_one_line(argv, message, tmp_path, capsys, monkeypatch, digits_shards):
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "keep.txt").write_text("earlier run")
    monkeypatch.chdir(tmp_path)
    if argv[0] == "--config":
        monkeypatch.chdir(Path(pretrain.__file__).parents[1])
    assert pretrain.main(bad_argv(argv, digits_shards)) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert (run_dir / "keep.txt").read_text() == "earlier run"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["demo"]


# Runs each bad command line through the job's main() in a fresh interpreter, where no Ray
# can have been started before (in this process, another test may have connected already).
_NO_RAY_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
import pretrain, ray
print(json.dumps([[pretrain.main(argv), ray.is_initialized()] for argv in json.loads(sys.argv[2])]))
"""


def test_bad_input_starts_no_ray(tmp_path, digits_shards):
    cases = [bad_argv(argv, digits_shards) for argv, _ in BAD_INPUT]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    jobs = str(Path(pretrain.__file__).parent)
    done = subprocess.run([sys.executable, "-c", _NO_RAY_SCRIPT, jobs, json.dumps(cases)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [[2, False]] * len(cases)


def evaluate_here(model, pattern: str, dtype: torch.dtype) -> dict[str, float]:
    """Top-1 (%) and mean loss of ``model`` over every sample of ``pattern``, in this process:
    a plain loop, to check the numbers the workers computed and summed over ranks."""
    config = load_config(overrides=[f"data.val_urls={pattern}", "data.eval_batch=100"])
    model = model.to(dtype).eval()
    correct, loss, count = 0, 0.0, 0
    loader = build_val_loader(config.data, img_size=32)
    with torch.no_grad():
        for images, labels in loader:
            keep = labels >= 0
            logits = model(normalize(images, config.data).to(dtype)).float()[keep]
            correct += int((logits.argmax(-1) == labels[keep]).sum())
            loss += float(F.cross_entropy(logits, labels[keep], reduction="sum"))
            count += int(keep.sum())
    assert count == loader.num_samples  # every sample once, padding left out
    return {"top1": 100 * correct / count, "loss": loss / count}


def assert_metrics_match(metrics, prefix, here):
    """The same batches in bf16 on another thread count: a sample may flip, the loss move by
    ~1e-5 (measured). Weights that are not the evaluated ones are much further off: zeros give
    ln(10) exactly (uniform logits), ~5e-3 away from these few-step models."""
    print(f"{prefix}: logged {metrics[f'{prefix}/top1']:.3f}% {metrics[f'{prefix}/loss']:.5f}, "
          f"recomputed {here['top1']:.3f}% {here['loss']:.5f}")
    assert metrics[f"{prefix}/top1"] == pytest.approx(here["top1"], abs=1.01 * 100 / 297), prefix
    assert metrics[f"{prefix}/loss"] == pytest.approx(here["loss"], abs=2e-4), prefix
    assert abs(here["loss"] - math.log(10)) > 2e-3  # so the check above tells weights apart


@pytest.mark.ray(cpus=2)
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
    for key in ("train/lr", "images_per_s", "images_per_s_per_worker", "val/top1",
                "val/top5", "val_ema/top1", "skipped_samples"):
        assert key in run.data.metrics, key
    assert run.data.tags["checkpoint_location"] == f"{tmp_path}/runs/zero2"
    assert run.data.tags["ray_job_id"] and run.data.tags["mlflow.source.git.commit"]
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

    # The validation numbers are those of the weights: the model in bf16 (as the engine ran
    # it), the EMA in fp32 (as it is evaluated), recomputed here on the whole split.
    assert_metrics_match(result.metrics, "val", evaluate_here(model, digits_shards["val"],
                                                              torch.bfloat16))
    here = evaluate_here(ema, digits_shards["val"], torch.float32)
    assert result.metrics["val_ema/top1"] == pytest.approx(here["top1"], abs=1e-9)
    assert result.metrics["val_ema/loss"] == pytest.approx(here["loss"], rel=1e-5)


def test_prepare_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = prepare(load_config(overrides=["data.train_urls=demo/t-{0000..0001}.tar",
                                            "data.val_urls=s3://b/v-{0000..0001}.tar"]), tmp_path)
    assert config.data.train_urls == f"{tmp_path}/demo/t-{{0000..0001}}.tar"
    assert config.data.val_urls == "s3://b/v-{0000..0001}.tar"
    assert config.run.storage_path == f"{tmp_path}/runs"
    assert config.run.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
