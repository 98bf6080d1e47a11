"""A training worker SIGKILLed mid-epoch: Ray Train restarts the worker group from the last
checkpoint and the run ends exactly where an uninterrupted run with the same seeds ends.

2 CPU workers, fp32, ZeRO-2, ``run.max_failures=1``; one epoch of 12 steps (two digits shards,
global batch 32), a checkpoint every 3 steps. A thread waits for the first checkpoint Ray
Train registered, then SIGKILLs one ``RayTrainWorker`` process of this cluster (found by
process title and session). Compared with the uninterrupted run: final weights, EMA, metrics
and every logged loss bit for bit; the samples seen in the epoch (from the final checkpoint's
``samples_seen``): the epoch's count, and the same fingerprint: none lost, none repeated.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from t2t_dist.config import load_config
from t2t_dist.launch import launch, prepare
from t2t_dist.tracking import RUN_NAME_TAG

GLOBAL_BATCH, EPOCH_STEPS = 32, 12  # 2 shards of 200 samples: 12 full global batches


def first_shards(pattern: str, count: int) -> str:
    """``.../digits-train-{0000..0007}.tar`` -> the first ``count`` shards."""
    return re.sub(r"\{0+\.\.(\d+)\}", lambda m: "{%s..%0*d}" % ("0" * len(m[1]), len(m[1]),
                                                              count - 1), pattern)


def fault_config(digits, tmp_path, name):
    return prepare(load_config(overrides=[
        f"data.train_urls={first_shards(digits['train'], 2)}",
        f"data.val_urls={first_shards(digits['val'], 1)}",
        "model.name=t2t_vit_tiny", "model.compile=false", "model.img_size=32", "model.num_classes=10",
        f"data.global_batch={GLOBAL_BATCH}", "data.eval_batch=100", "data.loader_workers=0",
        "optim.lr=1e-3", f"optim.reference_batch={GLOBAL_BATCH}", "optim.epochs=1",
        "optim.warmup_epochs=0.25", "optim.cooldown_epochs=0", "optim.ema_decay=0.9",
        "optim.grad_clip=1.0", "engine.zero_stage=2", "engine.precision=fp32",
        f"run.name={name}", f"run.storage_path={tmp_path}/runs",
        f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "run.log_every=1",
        "run.checkpoint_every=3", "run.keep_checkpoints=2", "run.log_model=false",
        "run.max_failures=1", "scaling.num_workers=2"]))


def train_worker_pids(session: int, since: float) -> list[int]:
    """Pids of this cluster's RayTrainWorker processes started after ``since`` (the process
    title Ray sets; the cluster's processes share the session of its ``ray start``, so other
    Ray clusters on the machine are never touched). Ray's state API lags by seconds here."""
    import psutil

    pids = []
    for process in psutil.process_iter(["pid", "cmdline", "create_time"]):
        try:
            title = " ".join(process.info["cmdline"] or [])
            if (title.startswith("ray::RayTrainWorker") and process.info["create_time"] >= since
                    and os.getsid(process.pid) == session):
                pids.append(process.pid)
        except (psutil.Error, ProcessLookupError):
            continue
    return sorted(pids)


def registered_checkpoint(run_dir: Path) -> str:
    """The latest checkpoint Ray Train's controller registered for the run ("" if none yet)."""
    try:
        found = re.findall(r"checkpoint_step_\d+", (run_dir / "checkpoint_manager_snapshot.json").read_text())
    except OSError:
        return ""
    return max(found, default="")


def kill_a_worker_after_a_checkpoint(run_dir: Path, session: int, since: float,
                                      pids: dict, done: threading.Event) -> None:
    """SIGKILL one RayTrainWorker of this run once Ray Train registered its first checkpoint;
    then note the pids of the worker group Ray Train starts in its place.

    Not at the first ``checkpoint_step_*`` folder: reports wait in the workers until the
    controller polls them, so a worker killed between its report and that poll takes the
    report with it and the run rightly starts over from step 0 (seen here), no resume.
    """
    while not done.is_set():
        found = train_worker_pids(session, since)
        if "killed" not in pids and len(found) == 2 and registered_checkpoint(run_dir):
            os.kill(found[-1], signal.SIGKILL)
            pids.update(killed=found[-1], before=found, registered=registered_checkpoint(run_dir))
        elif "killed" in pids and len(set(found) - set(pids["before"])) == 2:
            pids["after"] = sorted(set(found) - set(pids["before"]))
            return
        time.sleep(0.05)


def worker_output(cluster, pid: int) -> str:
    """What the Ray worker process ``pid`` printed (Ray's per-worker log files)."""
    logs = Path(cluster.temp_dir, "session_latest", "logs")
    return "".join(path.read_text(errors="replace") for path in logs.glob(f"worker-*-{pid}.out"))


def final_state(result):
    checkpoint = Path(result.checkpoint.path)
    client = torch.load(checkpoint / "client" / "rank_00000.pt", weights_only=False)
    module = torch.load(checkpoint / "state" / "mp_rank_00_model_states.pt",
                        weights_only=False, map_location="cpu")["module"]
    ema = torch.load(checkpoint / "ema.pt", weights_only=False)["shadow"]
    return client, module, ema


def logged(config, key):
    client = MlflowClient(config.run.tracking_uri)
    experiment = client.get_experiment_by_name(config.run.experiment)
    [run] = client.search_runs([experiment.experiment_id],
                               filter_string=f"tags.`{RUN_NAME_TAG}` = '{config.run.name}'")
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]


@pytest.mark.ray(cpus=2)
@pytest.mark.slow
def test_killed_worker_resumes_to_the_same_weights_and_samples(driver, digits_shards, tmp_path,
                                                               capfd):
    straight = launch(fault_config(digits_shards, tmp_path, "straight"))

    config = fault_config(digits_shards, tmp_path, "killed")
    pids: dict = {}
    done = threading.Event()
    killer = threading.Thread(target=kill_a_worker_after_a_checkpoint, daemon=True, args=(
        Path(config.run.storage_path) / config.run.name, driver.process.pid, time.time() - 1,
        pids, done))
    killer.start()
    try:
        recovered = launch(config)
    finally:
        done.set()
        killer.join(timeout=30)
    assert "killed" in pids, "no worker was killed (the run ended before its first checkpoint?)"
    assert "after" in pids, f"no new worker group after killing {pids['killed']}"
    output = "".join(worker_output(driver, pid) for pid in pids["after"])
    resumed = [int(s) for s in re.findall(r"resumed at step (\d+)", output)]
    assert resumed and 0 < resumed[0] < EPOCH_STEPS, output[-3000:]  # restarted mid-epoch
    console = capfd.readouterr().out  # the quiet console says why the workers restarted
    assert re.search(r"WARNING: worker \d failed \(\w+.*Ray Train restarts the workers", console), \
        console[-3000:]

    assert recovered.metrics["step"] == straight.metrics["step"] == EPOCH_STEPS
    differences = {key: abs(recovered.metrics[key] - straight.metrics[key])
                   for key in ("train/loss", "val/loss", "val/top1", "val_ema/loss", "val_ema/top1")}
    print(f"worker killed (pid {pids['killed']}) after {pids['registered']}, resumed at step "
          f"{resumed[0]}; final-metric "
          f"differences: {differences}")
    assert all(difference == 0 for difference in differences.values()), differences

    client, module, ema = final_state(recovered)
    client_straight, module_straight, ema_straight = final_state(straight)
    for name, tensor in module_straight.items():
        torch.testing.assert_close(module[name], tensor, rtol=0, atol=0, msg=name)
    for name, tensor in ema_straight.items():
        torch.testing.assert_close(ema[name], tensor, rtol=0, atol=0, msg=name)

    # None lost, none repeated: the whole epoch's samples, the same multiset as the straight run.
    seen, seen_straight = client["samples_seen"], client_straight["samples_seen"]
    print(f"samples seen: {seen}, uninterrupted: {seen_straight}")
    assert seen[0]["samples"] == seen_straight[0]["samples"] == EPOCH_STEPS * GLOBAL_BATCH
    assert seen[0]["fingerprint"] == seen_straight[0]["fingerprint"]

    # MLflow: every step once, the replayed steps not logged twice, the same losses.
    assert logged(config, "train/loss") == logged(fault_config(digits_shards, tmp_path, "straight"),
                                                  "train/loss")
    assert [step for step, _ in logged(config, "train/loss")] == list(range(1, EPOCH_STEPS + 1))
