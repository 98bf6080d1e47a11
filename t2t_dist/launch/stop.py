"""How a run stops, in one place: the driver asks, the workers stop, the driver learns why, or
that the run already trained to its end.

Driver and workers may run on different machines; they talk through two small files in the
run's folder (local, NFS or S3), beside the checkpoints:

    stop-request.json   the driver asks the workers to commit a checkpoint and stop
                        (``request_stop``, on Ctrl-C, SIGTERM or SIGUSR1:
                        ``stop_on_signals``); rank 0
                        looks every ``run.stop_check_every`` steps (``has_stop_request``)
    stopped.json        rank 0 writes why the run ended early (``record_stop``): "requested"
                        after that checkpoint, or "failed" (a non-finite loss)
    finished.json       rank 0 writes where a run that trained to its end ended
                        (``record_finish``): the step, its checkpoint, the last validation
                        numbers, the MLflow run; the same command again reads it
                        (``read_finish``) and says so in one line, before Ray starts

    folder = open_store(run_dir(config))
    with stop_on_signals(folder, check_every=config.run.stop_check_every) as received:
        result = beside_signals(trainer.fit)    # entering cleared what an earlier run left
    raise_if_stopped(folder, result, received, run_name=config.run.name)

Ctrl-C sends SIGINT to the terminal's whole foreground process group: the driver and, when
the driver started a local Ray, Ray's own processes (which block SIGINT; Ray's actors, our
workers among them, run in process groups of their own). Only the driver acts on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from typing import Any, Callable

from t2t_dist import dist
from t2t_dist.storage import Store

STOP_RECORD = "stopped.json"  # why the workers ended the run early
FINISH_RECORD = "finished.json"  # where a run that trained to its end ended
STOP_REQUEST = "stop-request.json"  # the driver asks the workers to checkpoint and stop
STOP_TAG = "t2t_dist.stopped"  # the MLflow tag a failed run's reason goes in
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(RuntimeError):
    """The workers stopped the run on purpose (a non-finite loss); the message says why and
    at which step. Not retried: the last good checkpoint stays the run's latest."""


class RunPreempted(RuntimeError):
    """The driver got ``signum`` (SIGINT, SIGTERM or SIGUSR1) and the workers stopped after
    committing a checkpoint: the same command resumes the run there."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# --- workers ---

def has_stop_request(folder: Store) -> bool:
    """Whether the run's folder holds a stop request."""
    try:
        folder.get(STOP_REQUEST)
    except FileNotFoundError:
        return False
    return True


def record_stop(folder: Store, message: str, *, kind: str) -> None:
    """Rank 0 writes why the run ended early (``kind``: "failed" or "requested"), where the
    driver reads it after ``fit`` (``raise_if_stopped``)."""
    if dist.is_main():
        folder.put(STOP_RECORD, json.dumps({"message": message, "kind": kind}).encode())


def record_finish(folder: Store, *, step: int, checkpoint: str, metrics: dict[str, float],
                  mlflow_run_id: str | None) -> None:
    """Rank 0, once the run trained to its end: the step, its checkpoint folder's name, the
    last validation numbers and the MLflow run."""
    if dist.is_main():
        record = {"step": step, "checkpoint": checkpoint, "mlflow_run_id": mlflow_run_id,
                  "metrics": {k: v for k, v in metrics.items() if k.startswith("val")}}
        folder.put(FINISH_RECORD, json.dumps(record, indent=1).encode())


# --- driver ---

def read_finish(folder: Store) -> dict[str, Any]:
    """What ``record_finish`` wrote ({} when the run never trained to an end, or its
    checkpoint of that step is gone)."""
    try:
        record = json.loads(folder.get(FINISH_RECORD))
        folder.get(f"{record['checkpoint']}/client/rank_00000.pt")  # still there
        return {"step": int(record["step"]), "checkpoint": str(record["checkpoint"]),
                "mlflow_run_id": record.get("mlflow_run_id"),
                "metrics": dict(record.get("metrics") or {})}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return {}


def request_stop(folder: Store, reason: str) -> None:
    """Ask the run's workers to commit a checkpoint and stop."""
    folder.put(STOP_REQUEST, json.dumps({"reason": reason}).encode())


def read_stop(folder: Store) -> dict[str, str]:
    """What the workers recorded when they ended the run early ({} when they did not)."""
    try:
        record = json.loads(folder.get(STOP_RECORD))
        return {"message": str(record["message"]), "kind": str(record.get("kind", "failed"))}
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return {}


def clear_stops(folder: Store) -> None:
    """Remove the stop record and request an earlier submission of this run name left."""
    folder.delete(STOP_RECORD)
    folder.delete(STOP_REQUEST)


def _announce(signum: int, check_every: int) -> str:
    name = signal.Signals(signum).name
    again = "Ctrl-C again" if signum == signal.SIGINT else f"{name} again"
    return (f"{name} received: the workers commit a checkpoint within "
            f"run.stop_check_every={check_every} steps and stop; {again} ends the driver at "
            f"once (the run then resumes from its last complete checkpoint)")


@contextlib.contextmanager
def stop_on_signals(folder: Store, *, check_every: int):
    """While inside: the first Ctrl-C (SIGINT), SIGTERM or SIGUSR1 asks the workers to commit a
    checkpoint and stop (``request_stop``; they look every ``check_every`` steps,
    ``run.stop_check_every``) instead of ending the driver; a second one ends it at once.

    Entering clears what an earlier submission of this run name left (``clear_stops``).
    Yields the list the received signal is appended to. Handlers only in the main thread
    (Python delivers signals there); elsewhere the default handling stays. Run Ray Train's
    ``fit`` through ``beside_signals``, or it replaces the SIGINT handler with its own.
    """
    received: list[int] = []
    clear_stops(folder)
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def ask_workers(signum, _frame):
        if received:  # the second signal: do what it would have done
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        request_stop(folder, signal.Signals(signum).name)
        sys.stdout.write("\n" if signum == signal.SIGINT else "")  # after the terminal's ^C
        sys.stdout.write(_announce(signum, check_every) + "\n")
        sys.stdout.flush()

    previous = {signum: signal.signal(signum, ask_workers) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        folder.delete(STOP_REQUEST)


def beside_signals(call: Callable[[], Any]) -> Any:
    """``call()`` in a thread of its own while the main thread waits for it, so the handlers
    of ``stop_on_signals`` stay in charge: Ray Train V2's ``fit``, called in the main thread,
    installs its own SIGINT handler, which aborts the run at once (no checkpoint, the MLflow
    run left RUNNING); in any other thread it leaves signals alone (as under Ray Tune).
    Returns what ``call`` returned; raises what it raised."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as error:  # handed to the main thread as it is
            outcome["error"] = error

    thread = threading.Thread(target=run, name="t2t-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)  # short waits: the main thread runs signal handlers between them
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def raise_if_stopped(folder: Store, result: Any, received: list[int], *, run_name: str) -> None:
    """After ``fit``: ``RunPreempted`` when the workers stopped on request after a checkpoint,
    ``TrainingStopped`` when they ended the run (a non-finite loss); nothing otherwise."""
    stopped = read_stop(folder)
    if stopped.get("kind") == "requested":
        checkpoint = result.checkpoint.path if result.checkpoint else "none"
        name = signal.Signals(received[0]).name if received else "a stop request"
        raise RunPreempted(f"stopped on {name} at {stopped['message']} with checkpoint "
                           f"{checkpoint}; the same command resumes {run_name} there",
                           received[0] if received else signal.SIGTERM)
    if stopped:
        raise TrainingStopped(stopped["message"])
