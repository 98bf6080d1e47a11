"""The documented commands as a user types them: another --model after the demo, the default job
under `ray job submit` with and without --working-dir, built-in demo data, near-miss names."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from t2t_dist.config import ConfigError, load_config, run_dir, run_name, to_dict
from t2t_dist.launch import prepare, preflight
from t2t_dist.launch.driver import save_resolved_config
from t2t_dist.launch.preflight import check_resumable
from t2t_dist.loop import planned_steps
from t2t_dist.storage import open_store
from t2t_dist.tracking import RUN_NAME_TAG

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEMO = REPO / "jobs" / "configs" / "demo.yaml"
# The demo as a user runs it, cut to two steps so a test can afford it.
SHORT = ["--set", "run.max_steps=2", "--set", "run.log_model=false", "--set", "run.max_failures=0",
         "--set", "optim.epochs=1", "--set", "optim.warmup_epochs=0"]


def test_run_name_follows_the_model_unless_given():
    demo = load_config(DEMO)
    assert run_name(demo) == "t2t_vit_mini-32px-10cls"
    assert planned_steps(demo, train_samples=1498) == 230  # 10 epochs of 1,498 // 64 steps
    assert run_name(load_config(DEMO, model="t2t_vit_24")) == "t2t_vit_24-32px-10cls"
    assert run_name(load_config(DEMO, overrides=["run.name=mine"])) == "mine"


def test_resuming_another_model_is_refused_in_one_line(tmp_path):
    first = load_config(DEMO, overrides=[f"run.storage_path={tmp_path}", "run.name=shared"])
    save_resolved_config(first, open_store(run_dir(first)))
    check_resumable(load_config(DEMO, overrides=[  # what may change on resume
        f"run.storage_path={tmp_path}", "run.name=shared", "optim.lr=1e-3", "optim.epochs=20",
        "scaling.num_workers=1", "run.eval_every=5", "model.drop_path_rate=0.1"]))
    other = load_config(DEMO, model="t2t_vit_24",
                        overrides=[f"run.storage_path={tmp_path}", "run.name=shared"])
    with pytest.raises(ConfigError) as refused:
        check_resumable(other)
    message = str(refused.value)
    assert "\n" not in message
    assert "model.name='t2t_vit_mini'" in message and "model.name='t2t_vit_24'" in message
    assert "--set run.name=NEW" in message
    assert (tmp_path / "shared" / "t2t_config.yaml").read_text() == yaml.safe_dump(
        to_dict(first), sort_keys=False)  # the refusal wrote nothing


def test_unknown_model_suggests_the_nearest_names(tmp_path, monkeypatch):
    config = load_config(DEMO, model="t2t_vit14")
    with pytest.raises(ConfigError, match=r"did you mean t2t_vit_14 or .*expected one of t2t_vit_7"):
        preflight(config)
    # prepare (which builds the digits:// demo data) refuses it before building anything
    monkeypatch.setenv("T2T_DIST_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"did you mean t2t_vit_14"):
        prepare(config, cwd=tmp_path)
    assert not (tmp_path / "cache").exists()


def test_demo_data_is_built_once_in_the_cache_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("T2T_DIST_CACHE", str(tmp_path / "cache"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    results: list = []

    def resolve():  # two jobs at once: one builds, the other waits on the lock
        results.append(prepare(load_config(DEMO), cwd=elsewhere).data)

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(results) == 2 and results[0] == results[1]
    data = results[0]
    root = tmp_path / "cache" / "digits-32px"
    assert data.train_urls == f"{root}/train/digits-train-{{0000..0007}}.tar"
    assert json.loads((root / "patterns.json").read_text())["val"] == data.val_urls
    preflight(prepare(load_config(DEMO), cwd=elsewhere))  # the shards resolve
    with pytest.raises(ValueError, match=r"'digits://test' is invalid: expected digits://train"):
        prepare(load_config(DEMO, overrides=["data.val_urls=digits://test"]))


def _job_env(cluster, cache: Path, tracking: str) -> dict[str, str]:
    return {**cluster.env(), "T2T_DIST_CACHE": str(cache), "MLFLOW_TRACKING_URI": tracking}


# What the console showed before it was quieted (issue 21), none of which a user should have
# to learn to ignore: Ray's worker prefixes and checkpoint reports, Ray core's internals,
# torch's and MLflow's warnings, Ray's token-auth warning, DeepSpeed's chatter, and a second
# Ray instance's traceback.
NOISE = ("(RayTrainWorker", "(TrainController", "(PlacementGroupCleaner", "Traceback",
         "core_worker.cc", "PreemptionWatcher", "FutureWarning", "all_gather_into_tensor",
         "Pickle", "CloudPickle", "Token authentication", "RAY_AUTH_MODE", "DeepSpeed",
         "deepspeed", "TrainingReport", "Checkpoint successfully created", "mlflow.store",
         "mlflow.pytorch", "mlflow.system_metrics", "INFO", "Found multiple active Ray instances")
# Every line a default run prints: the config summary, progress, evaluation, the closing lines.
OURS = re.compile(r"training t2t_vit_mini for \d+ steps|step \d+/\d+ \||eval  \||finished |"
                  r"checkpoints: |MLflow: ")


def submit(cluster, submission: str, env_vars: dict[str, str], script: str, *args: str,
           working_dir: bool = False, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``ray job submit`` of ``python <script> <args>`` to ``cluster``, as a user types it."""
    command = [str(VENV_BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url,
               "--submission-id", submission, "--runtime-env-json",
               json.dumps({"env_vars": env_vars}), *(["--working-dir", "."] if working_dir else []),
               "--", "python", script, *args]
    return subprocess.run(command, cwd=cwd, env=cluster.env(), capture_output=True, text=True,
                          timeout=600)


def submitted_run(tracking: str, name: str, submission: str) -> None:
    """The MLflow run knows which submission made it, and holds the step's loss once."""
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name(load_config(DEMO).run.experiment)
    [run] = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    assert run.data.tags["ray_submission_id"] == submission
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [2]


@pytest.mark.ray
@pytest.mark.slow
def test_another_model_after_the_demo_starts_its_own_run(ray_cluster, tmp_path):
    """The demo as `make demo` runs it, then the README's first command for another model,
    `ray job submit -- python jobs/pretrain.py --model ...` (no --working-dir: the script by
    its path, the run beside the demo's), then the same run name for another model."""
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    env = _job_env(ray_cluster, tmp_path / "cache", tracking)
    # The demo as `make demo` runs it (its models logged), cut to two steps.
    demo = subprocess.run([sys.executable, str(REPO / "jobs" / "pretrain.py"), *SHORT[:2],
                           *SHORT[4:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert demo.returncode == 0, (demo.stdout + demo.stderr)[-3000:]
    lines = demo.stdout.splitlines()
    print(f"the demo's console, {len(lines)} lines:\n{demo.stdout}{demo.stderr}")
    assert [line for line in lines + demo.stderr.splitlines()
            if any(noise in line for noise in NOISE)] == []
    assert [line for line in lines if not OURS.match(line)] == [] and demo.stderr == ""
    # The closing lines come last; the MLflow command runs as printed (no venv active).
    assert lines[-3].startswith("finished t2t_vit_mini-32px-10cls: step 2, val/top1 ")
    assert lines[-2].startswith("checkpoints: ")
    command, _, page = lines[-1].removeprefix("MLflow: ").partition("   then open ")
    assert command.split()[1:] == ["ui", "--backend-store-uri", "sqlite:///mlflow.db"]
    assert os.access(tmp_path / command.split()[0], os.X_OK)  # an absolute path stays one
    assert re.fullmatch(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]{32}", page)

    submission = f"t2t-other-{uuid.uuid4().hex[:8]}"
    other = submit(ray_cluster, submission, {"T2T_DIST_CACHE": str(tmp_path / "job-cache"),
                                             "MLFLOW_TRACKING_URI": tracking},
                   str(REPO / "jobs" / "pretrain.py"), *SHORT, "--model", "t2t_vit_tiny",
                   "--set", "scaling.num_workers=1", "--set", f"run.storage_path={tmp_path}/runs",
                   cwd=tmp_path)
    output = other.stdout + other.stderr
    assert other.returncode == 0, output[-4000:]
    assert f"Job '{submission}' succeeded" in output
    # Ray's own detached PlacementGroupCleaner logs a traceback when several Ray clusters run
    # on one host (it cannot tell which is its own): not ours, and not seen with one cluster.
    ours = [line for line in output.splitlines() if "PlacementGroupCleaner" not in line]
    assert not [line for line in ours if "Traceback" in line], output[-3000:]
    assert "resumed at step" not in output
    assert "finished t2t_vit_tiny-32px-10cls: step 2" in output
    assert (tmp_path / "job-cache" / "digits-32px" / "patterns.json").is_file()  # the job's env
    assert (tmp_path / "runs" / "t2t_vit_tiny-32px-10cls").is_dir()
    submitted_run(tracking, "t2t_vit_tiny-32px-10cls", submission)

    # The same run name for another model: refused in one line, before Ray, nothing touched.
    saved = (tmp_path / "runs" / "t2t_vit_mini-32px-10cls" / "t2t_config.yaml").read_text()
    job = [sys.executable, str(REPO / "jobs" / "pretrain.py"), *SHORT]
    clash = subprocess.run(job + ["--model", "t2t_vit_tiny", "--set", "run.name=t2t_vit_mini-32px-10cls"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert clash.returncode == 2
    assert clash.stderr.count("\n") == 1 and "expected the same to resume it" in clash.stderr
    assert (tmp_path / "runs" / "t2t_vit_mini-32px-10cls" / "t2t_config.yaml").read_text() == saved


@pytest.mark.ray
@pytest.mark.slow
def test_default_job_under_ray_job_submit_with_its_working_dir(ray_cluster, tmp_path):
    """`ray job submit --working-dir . -- python jobs/pretrain.py`: the repository uploaded, the
    script by its relative path. (Without --working-dir: the test above.)"""
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    submission = f"t2t-first-{uuid.uuid4().hex[:8]}"
    done = submit(ray_cluster, submission, {"T2T_DIST_CACHE": str(tmp_path / "cache"),
                                            "MLFLOW_TRACKING_URI": tracking},
                  "jobs/pretrain.py", *SHORT, "--set", f"run.storage_path={tmp_path}/runs",
                  working_dir=True)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert f"Job '{submission}' succeeded" in output
    assert "finished t2t_vit_mini-32px-10cls: step 2" in output
    assert (tmp_path / "cache" / "digits-32px" / "patterns.json").is_file()
    assert os.path.isdir(tmp_path / "runs" / "t2t_vit_mini-32px-10cls")
    submitted_run(tracking, "t2t_vit_mini-32px-10cls", submission)
