"""Weights handed to evaluation and fine-tuning workers through s3:// run storage.

A source that must be consolidated first (here a ``.safetensors`` file in the released layout;
our checkpoints and MLflow models take the same path) is written by the driver to
``<run.storage_path>/<run.name>/source_weights.pt`` through the run's store, and the workers
read it from there: with ``run.storage_path=s3://...`` (the session's moto server) the weights
load exactly, and the evaluation job on a Ray worker scores exactly what they score here.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import save_file

from ray_cluster import DRIVER_ENV
from t2t_dist.config import load_config
from t2t_dist.data import build_val_loader
from t2t_dist.engine import compute_dtypes
from t2t_dist.launch.build import build_model
from t2t_dist.launch.evaluation import WEIGHTS_FILE, materialize_weights
from t2t_dist.loop import evaluate
from t2t_dist.models import create_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
import evaluate as evaluate_job  # noqa: E402  (jobs/evaluate.py)

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]
AWS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="module")
def s3_driver(ray_cluster, s3_server):
    """This process as a driver whose Ray workers get the moto server's AWS_* settings (the
    session's cluster may have started before the server)."""
    import ray

    os.environ.update(DRIVER_ENV)
    ray.init(address=ray_cluster.address, logging_level="WARNING",
             runtime_env={"env_vars": {name: os.environ[name] for name in AWS}})
    yield ray_cluster
    ray.shutdown()


@pytest.fixture(scope="module")
def safetensors_weights(tmp_path_factory):
    torch.manual_seed(3)
    model = create_model("t2t_vit_tiny", img_size=32, num_classes=10)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path, model.state_dict()


def test_consolidated_weights_go_through_the_store_and_load_from_s3(s3_bucket, safetensors_weights):
    path, state = safetensors_weights
    config = load_config(overrides=["model.name=t2t_vit_tiny", "model.img_size=32",
                                    "model.num_classes=10", "run.name=handover",
                                    f"run.storage_path={s3_bucket}/runs"])
    config, _ = materialize_weights(config, str(path), new_head=False)
    assert config.model.pretrained == f"{s3_bucket}/runs/handover/{WEIGHTS_FILE}"
    bucket = s3_bucket[len("s3://"):]
    body = boto3.client("s3").get_object(Bucket=bucket, Key=f"runs/handover/{WEIGHTS_FILE}")["Body"]
    assert torch.load(io.BytesIO(body.read()), weights_only=True).keys() == state.keys()
    loaded = build_model(config).state_dict()  # what each worker does with model.pretrained
    for key, tensor in state.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0, msg=key)


def test_evaluation_with_s3_run_storage_scores_what_the_weights_score(
        s3_driver, s3_bucket, safetensors_weights, digits_shards, tmp_path, capsys):
    """The job on a Ray worker, its weights read from S3, against the same evaluation run
    here on the original weights (1 worker: the same batches, so the same sums)."""
    path, state = safetensors_weights
    settings = ["model.img_size=32", "model.num_classes=10", "model.compile=false",
                "data.eval_batch=100", "data.loader_workers=0", "scaling.num_workers=1",
                f"run.storage_path={s3_bucket}/evals", "run.name=eval-s3",
                f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    argv = ["--checkpoint", str(path), "--model", "t2t_vit_tiny", "--data", digits_shards["val"],
            *[arg for setting in settings for arg in ("--set", setting)]]
    assert evaluate_job.main(argv) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if " top-1 " in line]

    config = load_config(model="t2t_vit_tiny",
                         overrides=[f"data.val_urls={digits_shards['val']}", *settings])
    model = create_model("t2t_vit_tiny", img_size=32, num_classes=10)
    model.load_state_dict(state)
    dtype, autocast = compute_dtypes(config.engine)
    expected = evaluate(model.to(dtype).eval(), build_val_loader(config.data, img_size=32),
                        data=config.data, device=torch.device("cpu"), dtype=dtype,
                        autocast=autocast)
    print(line, expected)
    assert (f"top-1 {expected['top1']:.4f} | top-5 {expected['top5']:.4f} | "
            f"loss {expected['loss']:.6f}") in line
    keys = [item["Key"] for item in boto3.client("s3").list_objects_v2(
        Bucket=s3_bucket[len("s3://"):], Prefix="evals/eval-s3/").get("Contents", [])]
    assert f"evals/eval-s3/{WEIGHTS_FILE}" in keys
