"""The chaos run: the demo job for 30 epochs on a two-node Ray cluster while a seeded schedule
injects 16 faults, one after another, each once the job has recovered from the last and trained
a few more steps:

- ``worker_kill``: SIGKILL one Ray Train worker (Ray Train restarts the group, same size);
- ``node_loss`` / ``node_return``: every process of the second node SIGKILLed (the group goes
  on with one worker), later a fresh node with the same resource (it grows back to two);
- ``s3_restart``: the S3 server (moto, serving the training shards) closed for 1-4 s while
  the workers read from it, then started again;
- ``mlflow_outage``: the MLflow server stopped while the job trains 8-15 steps, then started
  again (recovered once the tracker's next retry has sent what it buffered);
- ``torn_checkpoint``: the workers SIGKILLed and, before the group restarts, the newest
  checkpoints' model files truncated to half (the one Ray Train registered and every newer one
  that every rank completed): the restart must skip them and resume from the one before;
- ``sigterm``: SIGTERM to the job's driver (it checkpoints and exits 143), then the same
  command again.

The job checkpoints every step (each report waits for Ray Train's controller, which polls
every second here), so it trains at most ~1 step/s and a slow recovery costs steps, not the
run. The uninterrupted run of the same job trains meanwhile on a Ray cluster of its own, with
its own copy of the shards and its own MLflow store, out of every fault's reach. It ends with a
summary (faults, recoveries, time to recover, steps redone, samples lost and repeated by the
samples-seen ledger, final metrics against the uninterrupted run) printed and saved as
``chaos-summary.json``, and checks: the job finished; every epoch's
ledger equals the uninterrupted run's (no sample lost or repeated); every step's training loss
equals the uninterrupted run's until the group first changes size (fp32 on CPU: a recovery at
the same size continues bit for bit); val top-1 within 1 point of the uninterrupted run's at
the end (each micro batch draws its dropout from its own seed, whichever worker trains it, but
one worker sums a step's gradients in another order than two that all-reduce them, so the runs
may part by rounding from the first size change); one MLflow run with every step logged exactly once. Every wait is
bounded.

Not in the default run (``make soak``): ~20 min on the 2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from elastic_harness import (OBJECT_STORE_BYTES, PROGRESS, Cluster, Job, WorkerLogs, demo_argv,
                             final_ledger, history, mlflow_run, registered_checkpoint)
from ray_cluster import session_processes, start_cluster
from t2t_dist.checkpoint import CHECKPOINT_PREFIX, checkpoint_step, missing_parts
from test_mlflow_outage import MlflowServer

pytestmark = [pytest.mark.soak, pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

SEED = 22
# Room for 16 faults and their recoveries: an MLflow outage alone lasts until the tracker's
# next retry (30 s), some 300 steps when the machine is quiet.
EPOCHS, EPOCH_STEPS, GLOBAL_BATCH = 30, 23, 64
STEPS = EPOCHS * EPOCH_STEPS
FAULTS = {"worker_kill": 6, "node_loss": 1, "node_return": 1, "s3_restart": 3,
          "mlflow_outage": 2, "torn_checkpoint": 1, "sigterm": 2}
# A checkpoint every step (each report waits for Ray Train's controller to poll, every 1 s
# here): ~1 step/s at most, so a recovery that takes a minute costs steps, not the whole run.
SETTINGS = [f"optim.epochs={EPOCHS}", "engine.precision=fp32", "scaling.min_workers=1",
            "scaling.resize_check_s=5", "scaling.start_timeout_s=30", "run.checkpoint_every=1",
            "run.keep_checkpoints=3", "run.log_every=1", "run.stop_check_every=2",
            "run.max_failures=20"]
ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1"}
RECOVER_S = 420  # the most any one fault may take to recover from, loaded machine included


def schedule(seed: int) -> list[tuple[str, int]]:
    """The faults in order, each with the steps to train after the previous recovery: seeded.
    The node returns two faults after it was lost; MLflow is not down near the end (the
    tracker flushes on its next retry, 30 s later)."""
    rng = random.Random(seed)
    kinds = [kind for kind, count in FAULTS.items() for _ in range(count)
             if kind not in ("node_loss", "node_return")]
    while True:
        rng.shuffle(kinds)
        if all(kind != "mlflow_outage" for kind in kinds[-3:]):
            break
    lost = rng.randrange(1, 5)
    kinds.insert(lost, "node_loss")
    kinds.insert(lost + 3, "node_return")
    return [(kind, rng.randrange(3, 8)) for kind in kinds]


class Chaos:
    """Runs the job and injects the faults; keeps what each did. What the job says is read
    from the workers' own log files (``WorkerLogs``), not from the driver's lagging copy."""

    def __init__(self, cluster: Cluster, s3, mlflow: MlflowServer, argv, env, tmp_path: Path):
        self.cluster, self.s3, self.mlflow, self.env = cluster, s3, mlflow, env
        self.argv, self.log = argv, tmp_path / "chaos.log"
        self.run_dir = tmp_path / "runs" / "chaos"
        self.rng = random.Random(SEED + 1)
        self.logs = WorkerLogs(cluster)
        self.logs.mark()
        self.job = Job(argv, env=env, log=self.log)
        self.jobs = [self.job]
        self.records: list[dict] = []
        self.event: tuple[Path, int] | None = None  # where the last expected line ended

    # --- what the job says ---

    def train(self, steps: int) -> int:
        """Let the job train ``steps`` more steps from now; returns the last step seen."""
        self.logs.mark()
        deadline, first = time.monotonic() + RECOVER_S, None
        while True:
            seen = self.logs.steps()
            if seen and first is None:
                first = min(seen)
            if seen and max(seen) >= first + steps:
                return max(seen)
            assert self.job.process.poll() is None, self.job.output()[-4000:]
            assert time.monotonic() < deadline, f"no {steps} steps trained in {RECOVER_S} s"
            time.sleep(0.2)

    def expect(self, pattern: str) -> re.Match:
        """The next line matching ``pattern`` since the fault began (any worker)."""
        path, found = self.logs.wait_for(pattern, timeout=RECOVER_S, alive=self.job)
        self.event = (path, found.end())
        return found

    def training_again(self) -> int:
        """The first progress line after the last expected one, from the same worker."""
        path, found = self.logs.wait_for(PROGRESS, timeout=RECOVER_S, alive=self.job,
                                         after=self.event)
        return int(found[1])

    def resumed(self) -> int:
        return int(self.expect(r"resumed at step (\d+)")[1])

    def old_group_reached(self, at: int) -> int:
        """The last step the group that was lost printed (files other than the new rank 0's)."""
        texts = self.logs.new_text()
        steps = [int(m[1]) for path, text in texts.items() if self.event is None
                 or path != self.event[0] for m in re.finditer(PROGRESS, text)]
        return max([at, *steps])

    # --- faults ---

    def worker_pids(self) -> list[int]:
        sessions = {self.cluster.head.process.pid, *(n.process.pid for n in self.cluster.nodes)}
        pids = []
        for session in sessions:
            for process in session_processes(session):
                try:
                    if " ".join(process.cmdline()).startswith("ray::RayTrainWorker"):
                        pids.append(process.pid)
                except psutil.Error:
                    continue
        return sorted(pids)

    def kill_a_worker(self) -> int:
        pid = self.rng.choice(self.worker_pids())
        psutil.Process(pid).send_signal(signal.SIGKILL)
        return pid

    def worker_kill(self, at: int) -> dict:
        pid = self.kill_a_worker()
        resumed = self.resumed()
        return {"pid": pid, "resumed_at": resumed, "redone": self.old_group_reached(at) - resumed}

    def node_loss(self, at: int) -> dict:
        killed = self.cluster.lose(self.cluster.nodes[-1])
        resumed = int(self.expect(r"\bworkers 2 -> 1 at step (\d+)")[1])
        return {"processes_killed": killed, "resumed_at": resumed,
                "redone": self.old_group_reached(at) - resumed}

    def node_return(self, at: int) -> dict:
        self.cluster.add_node()
        resumed = int(self.expect(r"\bworkers 1 -> 2 at step (\d+)")[1])
        return {"resumed_at": resumed, "redone": self.old_group_reached(at) - resumed}

    def s3_restart(self, at: int) -> dict:
        down = self.rng.uniform(1, 4)
        self.s3.stop()
        time.sleep(down)
        self.s3.start()
        self.event = None
        restarted = [int(m[1]) for text in self.logs.new_text().values()
                     for m in re.finditer(r"resumed at step (\d+)", text)]
        return {"down_s": round(down, 1), "group_restarted": bool(restarted)}

    def mlflow_outage(self, at: int) -> dict:
        self.mlflow.stop()
        down_since = time.monotonic()
        trained = self.train(self.rng.randrange(8, 16))
        down = time.monotonic() - down_since
        self.mlflow.start(timeout=RECOVER_S)  # its start alone took over 120 s under load
        back = self.train(1)
        # Recovered once the tracker's next retry (every 30 s) sent what it buffered.
        deadline = time.monotonic() + 240
        while True:
            client, runs = mlflow_run(self.mlflow.uri, "t2t-dist-demo", "chaos")
            logged = [s for s, _ in history(client, runs[0].info.run_id, "train/loss")] if runs else []
            if logged and max(logged) >= back:
                break
            assert self.job.process.poll() is None, self.job.output()[-4000:]
            assert time.monotonic() < deadline, f"MLflow still lacks step {back}: {logged[-5:]}"
            time.sleep(2)
        self.event = None
        return {"down_s": round(down, 1), "steps_while_down": trained - at}

    def torn_checkpoint(self, at: int) -> dict:
        """The workers lost while the newest checkpoints are torn: the one Ray Train registered
        and every newer one all ranks completed (by our commit markers; under load Ray Train's
        registration lags by several), truncated before the group restarts. Every worker at
        once: a survivor could complete a checkpoint whose other part was already written."""
        for pid in self.worker_pids():  # from here on no checkpoint completes
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).send_signal(signal.SIGKILL)
        registered = registered_checkpoint(self.run_dir)
        floor = checkpoint_step(registered) if registered else 0
        complete = {folder.name for folder in self.run_dir.glob(f"{CHECKPOINT_PREFIX}*")
                    if checkpoint_step(folder.name) >= floor and not missing_parts(folder)}
        names = ({registered} | complete) - {""}
        sizes = {}
        for name in names:
            model = self.run_dir / name / "state" / "mp_rank_00_model_states.pt"
            sizes[name] = model.stat().st_size
            with open(model, "r+b") as file:
                file.truncate(sizes[name] // 2)
        self.expect(rf"skipping checkpoint \S*({'|'.join(map(re.escape, names))}): \S+ "
                    rf"\(rank \d\) has \d+ bytes, expected \d+; trying the previous one")
        resumed = self.resumed()
        assert resumed < min(checkpoint_step(name) for name in names)
        return {"torn": sorted(names), "resumed_at": resumed,
                "redone": self.old_group_reached(at) - resumed}

    def sigterm(self, at: int) -> dict:
        self.job.signal(signal.SIGTERM)
        code = self.job.wait(timeout=RECOVER_S)
        stopped = re.search(r"stopped on SIGTERM at step (\d+)", self.job.output())
        assert code == 143 and stopped, self.job.output()[-3000:]
        self.job = Job(self.argv, env=self.env, log=self.log)  # the same command again
        self.jobs.append(self.job)
        resumed = self.resumed()
        assert resumed == int(stopped[1])
        return {"stopped_at": int(stopped[1]), "resumed_at": resumed, "redone": 0}

    def run(self, plan: list[tuple[str, int]]) -> None:
        for kind, steps in plan:
            at = self.train(steps)
            self.logs.mark()
            started = time.monotonic()
            record = {"kind": kind, "at_step": at, **getattr(self, kind)(at)}
            after = self.training_again() if self.event else self.train(1)
            record.update(recover_s=round(time.monotonic() - started, 1), next_step=after)
            self.records.append(record)
            print(f"fault {len(self.records):2d}: {record}", flush=True)


@pytest.fixture
def chaos_cluster(s3_server):
    """Two 1-CPU nodes started after the S3 server, so Ray's workers inherit AWS_*."""
    cluster = Cluster.start(cpus_per_node=1, nodes=2)
    yield cluster
    cluster.stop()


@pytest.mark.timeout(5400)
def test_chaos_run_recovers_from_every_fault_without_losing_or_repeating_a_sample(
        chaos_cluster, s3_server, s3_bucket, tmp_path):
    from t2t_dist.data import make_digits_dataset

    started = time.monotonic()
    plan = schedule(SEED)
    assert len(plan) >= 15 and {kind for kind, _ in plan} == set(FAULTS)
    # The uninterrupted run of the same job, meanwhile, on a Ray cluster of its own (so no fault
    # reaches it) with its own copy of the shards and an MLflow store of its own.
    reference_cluster = start_cluster(2, object_store_bytes=OBJECT_STORE_BYTES)
    mlflow = MlflowServer(tmp_path)
    try:
        local = make_digits_dataset(str(tmp_path / "digits"), img_size=32)
        shards = make_digits_dataset(f"{s3_bucket}/digits", img_size=32)
        reference_dir = tmp_path / "reference"
        reference_dir.mkdir()
        reference = Job(demo_argv("uninterrupted", reference_dir, *SETTINGS,
                                  f"data.train_urls={local['train']}", f"data.val_urls={local['val']}"),
                        env={**reference_cluster.env(), **ENV}, log=tmp_path / "uninterrupted.log")
        mlflow.start(timeout=RECOVER_S)
        chaos = Chaos(chaos_cluster, s3_server, mlflow, demo_argv(
            "chaos", tmp_path, *SETTINGS, f"data.train_urls={shards['train']}",
            f"data.val_urls={shards['val']}", f"run.tracking_uri={mlflow.uri}"),
            chaos_cluster.env(**ENV), tmp_path)
        try:
            chaos.run(plan)
            assert chaos.job.wait(timeout=2400) == 0, chaos.job.output()[-4000:]
            assert reference.wait(timeout=1200) == 0, reference.output()[-4000:]
        finally:
            chaos.job.kill()
            reference.kill()
        total_s = time.monotonic() - started
        assert f"finished chaos: step {STEPS}" in chaos.job.output()

        ledger = final_ledger(chaos.run_dir, STEPS)
        expected = final_ledger(reference_dir / "runs" / "uninterrupted", STEPS)
        seen = {epoch: ledger.get(epoch, {}).get("samples", 0) for epoch in range(EPOCHS)}
        client, [run] = mlflow_run(mlflow.uri, "t2t-dist-demo", "chaos")
        reference_client, [reference_run] = mlflow_run(f"sqlite:///{reference_dir}/mlflow.db",
                                                       "t2t-dist-demo", "uninterrupted")
        metrics = {}
        for key in ("val/top1", "val/loss", "val_ema/top1", "train/loss"):
            ours = history(client, run.info.run_id, key)[-1][1]
            theirs = history(reference_client, reference_run.info.run_id, key)[-1][1]
            metrics[key] = {"chaos": ours, "uninterrupted": theirs, "difference": ours - theirs}
        logged = history(client, run.info.run_id, "train/loss")
        steps = [step for step, _ in logged]
        losses = dict(logged)
        reference_losses = dict(history(reference_client, reference_run.info.run_id, "train/loss"))
        # Bit for bit until the first size change: the node loss resumes on one worker there.
        first_resize = min(r["resumed_at"] for r in chaos.records if r["kind"] == "node_loss")
        exact_until = next((step for step in sorted(losses)
                            if losses[step] != reference_losses.get(step)), STEPS + 1) - 1
        restarts = sum(len(re.findall(r"resumed at step \d+", job.output())) for job in chaos.jobs)
        times = sorted(record["recover_s"] for record in chaos.records)
        per_epoch = EPOCH_STEPS * GLOBAL_BATCH
        summary = {
            "faults": len(chaos.records),
            "by_kind": {kind: sum(r["kind"] == kind for r in chaos.records) for kind in FAULTS},
            "recoveries": restarts,
            "recover_s": {"min": times[0], "median": times[len(times) // 2], "max": times[-1]},
            "steps_redone": sum(record.get("redone", 0) for record in chaos.records),
            "samples": {"per_epoch": per_epoch,
                        "lost": sum(max(0, per_epoch - n) for n in seen.values()),
                        "repeated": sum(max(0, n - per_epoch) for n in seen.values()),
                        "fingerprints_equal": ledger == expected},
            "final_metrics": metrics,
            "train_loss_equal_until_step": exact_until, "first_size_change_at": first_resize,
            "mlflow": {"runs": 1, "steps_logged": len(steps), "distinct": len(set(steps))},
            "wall_s": round(total_s),
            "faults_in_order": chaos.records,
        }
        (tmp_path / "chaos-summary.json").write_text(json.dumps(summary, indent=1))
        print("\nchaos summary:", json.dumps({k: v for k, v in summary.items()
                                                if k != "faults_in_order"}, indent=1))

        assert summary["faults"] >= 15
        assert summary["samples"]["lost"] == summary["samples"]["repeated"] == 0
        assert ledger == expected  # the same samples in every epoch, by fingerprint
        assert exact_until >= first_resize, (exact_until, first_resize)
        assert abs(metrics["val/top1"]["difference"]) <= 1.0, metrics
        assert steps == list(range(1, STEPS + 1))  # every step once, none lost, none twice
    finally:
        mlflow.stop()
        reference_cluster.stop()
