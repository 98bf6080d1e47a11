"""A NaN loss stops the whole job at once: one line naming the step, a non-zero exit, no retry
(``run.max_failures=3`` would otherwise restart the deterministic failure three times), the
last good checkpoint kept, the MLflow run closed FAILED with the reason.

The job runs as a user runs it (``python jobs/pretrain.py``) against the session's Ray cluster:
1 worker, fp32, a learning rate of 1e30 with no clipping, which overflows the weights within
the first steps (no fault hook: the real arithmetic goes non-finite).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from t2t_dist.tracking import RUN_NAME_TAG

JOB = Path(__file__).resolve().parents[1] / "jobs" / "pretrain.py"


@pytest.mark.ray(cpus=2)
@pytest.mark.slow
def test_nan_loss_stops_the_job_once_and_keeps_the_last_good_checkpoint(ray_cluster, digits_shards,
                                                                        tmp_path):
    argv = [sys.executable, str(JOB), "--model", "t2t_vit_tiny",
            "--set", f"data.train_urls={digits_shards['train']}",
            "--set", f"data.val_urls={digits_shards['val']}",
            "--set", "data.global_batch=16", "--set", "optim.reference_batch=16",
            "--set", "optim.lr=1e30", "--set", "optim.grad_clip=0", "--set", "optim.warmup_epochs=0",
            "--set", "optim.ema_decay=0", "--set", "engine.precision=fp32",
            "--set", "scaling.num_workers=1", "--set", "run.name=nan-run",
            "--set", f"run.storage_path={tmp_path}/runs",
            "--set", f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            "--set", "run.log_every=1", "--set", "run.checkpoint_every=1",
            "--set", "run.max_steps=8", "--set", "run.max_failures=3", "--set", "run.log_model=false"]
    done = subprocess.run(argv, cwd=tmp_path, env=ray_cluster.env(), capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("pretrain: error:")]
    assert done.returncode == 1, output[-3000:]
    assert len(errors) == 1, output[-3000:]
    match = re.fullmatch(r"pretrain: error: training loss is (nan|inf|-inf) at step (\d+): lower "
                         r"optim.lr or raise optim.warmup_epochs", errors[0])  # fp32 already
    assert match, errors[0]
    bad_step = int(match[2])
    assert "finished nan-run" not in done.stdout  # no summary of a run that did not finish

    # The workers started once: no restart from a checkpoint (it would say "resumed at step").
    assert output.count("training t2t_vit_tiny for 8 steps") == 1, output[-3000:]
    assert "resumed at step" not in output

    # Every step before the NaN was checkpointed (checkpoint_every=1); nothing at or after it.
    run_dir = tmp_path / "runs" / "nan-run"
    steps = sorted(int(p.name.rsplit("_", 1)[1]) for p in run_dir.glob("checkpoint_step_*"))
    assert steps and steps[-1] == bad_step - 1, (steps, bad_step)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("t2t-dist-demo")
    [run] = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = 'nan-run'")
    assert run.info.status == "FAILED"
    assert run.data.tags["t2t_dist.stopped"] == errors[0].removeprefix("pretrain: error: ")
