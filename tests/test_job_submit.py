"""`ray job submit -- python jobs/pretrain.py ...` against a `ray start --head` cluster."""

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ray_cluster import VENV_BIN
from t2t_dist.config import load_config, save_config
from t2t_dist.launch import prepare
from t2t_dist.tracking import RUN_NAME_TAG

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.slow
def test_submitted_job_runs_to_completion(ray_cluster, digits_shards, tmp_path):
    # The job's driver runs in a directory of Ray's choosing: the config holds absolute paths.
    config = prepare(load_config(overrides=[
        f"data.train_urls={digits_shards['train']}", f"data.val_urls={digits_shards['val']}",
        "model.name=t2t_vit_tiny", "model.compile=false", "model.img_size=32", "model.num_classes=10",
        "data.global_batch=16",
        "data.eval_batch=100", "data.loader_workers=0", "optim.epochs=1",
        "optim.warmup_epochs=0", "optim.cooldown_epochs=0", "optim.ema_decay=0",
        "run.name=submitted", "run.max_steps=2", "run.log_model=false", "run.max_failures=0",
        "engine.precision=fp32", "scaling.num_workers=2"]), tmp_path)
    save_config(config, tmp_path / "tiny.yaml")
    submission = f"t2t-test-{uuid.uuid4().hex[:8]}"
    command = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url,
               "--submission-id", submission, "--",
               sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", str(tmp_path / "tiny.yaml")]
    done = subprocess.run(command, env=ray_cluster.env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=400)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert f"Job '{submission}' succeeded" in output
    assert "finished submitted: step 2" in output  # the job's closing lines

    client = MlflowClient(config.run.tracking_uri)
    experiment = client.get_experiment_by_name(config.run.experiment)
    [run] = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = 'submitted'")
    assert run.data.tags["ray_submission_id"] == submission
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [2]
