"""The console and Ctrl-C, without Ray: what the driver prints of the workers' forwarded lines,
when it may print its closing lines, and how a signal becomes a stop request.

The whole job under Ctrl-C, with Ray: test_faults_job.py; the demo's console: test_first_contact.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from t2t_dist.dist import CONSOLE_END, CONSOLE_MARK
from t2t_dist.launch.console import Console, is_verbose, set_verbose
from t2t_dist.launch.stop import (STOP_REQUEST, beside_signals, has_stop_request,
                                  stop_on_signals)
from t2t_dist.storage import open_store


def forwarded(pid: int, *lines: str, err: bool = False) -> dict:
    """A batch of lines as Ray's log monitor hands them to the driver."""
    return {"pid": pid, "lines": list(lines), "is_err": err, "actor_name": "RayTrainWorker"}


def test_quiet_console_prints_our_lines_only_and_settles_on_rank_0s_last(capsys):
    console = Console(verbose=False)
    console.handle(forwarded(11, "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built",
                             f"{CONSOLE_MARK}step 10/230 | epoch 0 | loss 2.3382"))
    console.handle(forwarded(12, "Checkpoint successfully created at: Checkpoint(...)",
                             "Reporting training result 1: TrainingReport(checkpoint=...)"))
    console.handle(forwarded(11, f"{CONSOLE_MARK}WARNING: skipping checkpoint x: torn",
                             "/site-packages/torch/distributed/c10d.py: FutureWarning: ...",
                             err=True))
    out, err = capsys.readouterr()
    assert out == "step 10/230 | epoch 0 | loss 2.3382\n"
    assert err == "WARNING: skipping checkpoint x: torn\n"
    assert console.printed == 2

    # Rank 0 (pid 11) has not said its last line: the closing lines wait for it (briefly).
    started = time.monotonic()
    assert not console.settle(0.3) and time.monotonic() - started >= 0.3
    threading.Timer(0.2, console.handle, [forwarded(11, f"{CONSOLE_MARK}eval  | val/top1 96",
                                                    CONSOLE_END)]).start()
    assert console.settle(10.0)
    assert capsys.readouterr().out == "eval  | val/top1 96\n"  # the end marker is not shown

    # A restarted worker group: the new rank 0 speaks; the old one's end does not count.
    console.handle(forwarded(21, f"{CONSOLE_MARK}training ..., resumed at step 40"))
    assert not console.settle(0.1)
    console.handle(forwarded(21, CONSOLE_END))
    assert console.settle(0.1)


def test_verbose_console_leaves_printing_to_ray(capsys, monkeypatch):
    monkeypatch.setenv("T2T_DIST_VERBOSE", "")  # restored after the test
    assert not is_verbose()
    set_verbose(True)  # --verbose
    assert is_verbose()
    console = Console(verbose=True)
    console.handle(forwarded(11, f"{CONSOLE_MARK}step 10/230", "DeepSpeed ..."))
    assert capsys.readouterr().out == ""  # Ray's own printer shows every line, prefixed
    assert not console.settle(0.05)


def test_signals_ask_the_workers_and_fit_runs_beside_them(tmp_path):
    """SIGTERM and SIGINT alike write the stop request, from the main thread, while the
    call runs in its own thread (where Ray Train's fit leaves signal handlers alone: setting
    one there raises)."""
    folder = open_store(tmp_path)

    def fit():
        with pytest.raises(ValueError, match="main thread"):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not has_stop_request(folder) and time.monotonic() < deadline:
            time.sleep(0.01)
        return "result"

    with stop_on_signals(folder, check_every=5) as received:
        assert beside_signals(fit) == "result"
    assert received == [signal.SIGTERM]
    assert not (tmp_path / STOP_REQUEST).exists()  # leaving clears the request

    with pytest.raises(KeyError):
        beside_signals(lambda: {}["missing"])  # raised in the thread, re-raised here


SECOND_CTRL_C = textwrap.dedent("""
    import os, signal, sys, time
    from t2t_dist.launch.stop import stop_on_signals
    from t2t_dist.storage import open_store
    with stop_on_signals(open_store(sys.argv[1]), check_every=10):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        print("still here", flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    print("not reached", flush=True)
""")


def test_a_second_ctrl_c_ends_the_driver_at_once(tmp_path):
    done = subprocess.run([sys.executable, "-c", SECOND_CTRL_C, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGINT, done.stderr  # ended by it, not after the sleep
    lines = done.stdout.splitlines()
    assert lines[0] == ""  # after the terminal's ^C
    assert lines[1].startswith("SIGINT received: the workers commit a checkpoint within "
                               "run.stop_check_every=10 steps and stop; Ctrl-C again ends")
    assert lines[2:] == ["still here"]
    assert (tmp_path / STOP_REQUEST).exists()  # the workers were asked before
