"""How a run stops early, in one place: the driver asks, the workers stop, the driver learns why.

Driver and workers may run on different machines; they talk through two small files in the
run's folder (local, NFS or S3), beside the checkpoints:

    stop-request.json   the driver asks the workers to commit a checkpoint and stop
                        (``request_stop``, on SIGTERM/SIGUSR1: ``stop_on_signals``); rank 0
                        looks every ``run.stop_check_every`` steps (``has_stop_request``)
    stopped.json        rank 0 writes why the run ended early (``record_stop``): "requested"
                        after that checkpoint, or "failed" (a non-finite loss)

    folder = open_store(run_dir(config))
    with stop_on_signals(folder, check_every=config.run.stop_check_every) as received:
        result = trainer.fit()                  # entering cleared what an earlier run left
    raise_if_stopped(folder, result, received, run_name=config.run.name)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from typing import Any

from t2t_dist import dist
from t2t_dist.storage import Store

STOP_RECORD = "stopped.json"  # why the workers ended the run early
STOP_REQUEST = "stop-request.json"  # the driver asks the workers to checkpoint and stop
STOP_TAG = "t2t_dist.stopped"  # the MLflow tag a failed run's reason goes in
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(RuntimeError):
    """The workers stopped the run on purpose (a non-finite loss); the message says why and
    at which step. Not retried: the last good checkpoint stays the run's latest."""


class RunPreempted(RuntimeError):
    """The driver got ``signum`` (SIGTERM or SIGUSR1) and the workers stopped after committing
    a checkpoint: the same command resumes the run there."""

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


# --- driver ---

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


@contextlib.contextmanager
def stop_on_signals(folder: Store, *, check_every: int):
    """While inside: the first SIGTERM or SIGUSR1 asks the workers to commit a checkpoint and
    stop (``request_stop``; they look every ``check_every`` steps, ``run.stop_check_every``)
    instead of ending the driver; a second one ends it at once.

    Entering clears what an earlier submission of this run name left (``clear_stops``).
    Yields the list the received signal is appended to. Handlers only in the main thread
    (Python delivers signals there); elsewhere the default handling stays.
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
        sys.stdout.write(f"{signal.Signals(signum).name} received: the workers commit a checkpoint "
                         f"within run.stop_check_every={check_every} steps and "
                         f"stop (send it again to end the driver now)\n")
        sys.stdout.flush()

    previous = {signum: signal.signal(signum, ask_workers) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        folder.delete(STOP_REQUEST)


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
