"""The console a run prints to: our own lines, and the libraries' logs only when asked for.

Ray forwards what every worker and actor prints to the driver, each line prefixed with its
process (``(RayTrainWorker pid=...)``): Ray Train's checkpoint lines and ``TrainingReport``
dumps, DeepSpeed's init chatter, MLflow's warnings, torch's FutureWarnings, Ray core's
error-level internals, a second Ray instance's tracebacks. By default the driver shows only
what the workers mark as ours (``dist.say``: progress, evaluation, warnings), without Ray's
prefix, plus its own lines; its own library loggers (Ray, MLflow, DeepSpeed) report errors
only. ``--verbose`` or ``T2T_DIST_VERBOSE=1`` brings everything back as Ray prints it.

    quiet_libraries()                  # before Ray and MLflow load: their driver-side loggers
    ray.init(...)
    with open_console():               # takes over the workers' forwarded lines
        result = trainer.fit()         # on leaving: rank 0's last line has arrived (or 10 s)

Any driver can use this (training, evaluation, a sweep). Ray delivers forwarded lines through
``global_worker_stdstream_dispatcher`` (``ray._private.ray_logging``, where ``ray.init`` adds
its own printer): a private name, so when it moves the console falls back to Ray's printing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import warnings

from t2t_dist.dist import CONSOLE_END, CONSOLE_MARK

VERBOSE_ENV = "T2T_DIST_VERBOSE"
RAY_PRINTER = "ray_print_logs"  # the name ray.init registers its printer of worker lines under
OUR_PRINTER = "t2t_dist_console"
QUIET_LOGGERS = ("ray", "mlflow", "alembic", "DeepSpeed", "deepspeed", "torch", "urllib3",
                 "botocore", "filelock")


def is_verbose() -> bool:
    """Whether the libraries' logs are wanted (``--verbose`` sets ``T2T_DIST_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(verbose: bool) -> None:
    """``--verbose``: through the environment, so every part of the driver (and a driver that
    runs as a Tune trial) reads the same answer."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"


def quiet_libraries() -> None:
    """Unless verbose: the driver's library loggers report errors only and library warnings
    are not shown (ours, from ``t2t_dist``, still are). Call before MLflow is imported: it sets
    its loggers' level from ``MLFLOW_LOGGING_LEVEL`` on import."""
    if is_verbose():
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"t2t_dist(\.|$)")


class Console:
    """Receives the lines Ray forwards from workers (a batch per process and stream):
    prints ours (quiet) and notes when the process that spoke last has said its last line."""

    def __init__(self, *, verbose: bool) -> None:
        self.verbose = verbose
        self.printed = 0  # our lines printed
        self._changed = threading.Condition()
        self._speaker = None  # the process that said our latest line
        self._ended: set = set()  # processes that said CONSOLE_END

    def handle(self, data: dict) -> None:
        ours = []
        with self._changed:
            for line in data.get("lines", []):
                if line.startswith(CONSOLE_END):
                    self._ended.add(data.get("pid"))
                elif line.startswith(CONSOLE_MARK):
                    ours.append(line[len(CONSOLE_MARK):])
                    self._speaker = data.get("pid")
            self._changed.notify_all()
        if ours and not self.verbose:  # verbose: Ray's own printer shows them, prefixed
            stream = sys.stderr if data.get("is_err") else sys.stdout
            stream.write("".join(line + "\n" for line in ours))
            stream.flush()
            self.printed += len(ours)

    def settle(self, timeout: float) -> bool:
        """Wait until the process that said our latest line said its last one (its output has
        all arrived), at most ``timeout`` s; True when it has, or when no worker said anything."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._speaker is not None and self._speaker not in self._ended:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True


def _dispatcher():
    try:  # see the module docstring: private, so looked up defensively
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    needed = ("handlers", "add_handler", "remove_handler")
    return global_worker_stdstream_dispatcher if all(
        hasattr(global_worker_stdstream_dispatcher, name) for name in needed) else None


@contextlib.contextmanager
def open_console(*, verbose: bool | None = None, settle_s: float = 10.0):
    """While inside, the workers' forwarded lines go through a ``Console`` (yielded); leaving
    waits up to ``settle_s`` for rank 0's last line, so the closing lines the driver prints
    next come after everything the workers said. Ray's own printer is restored on leaving."""
    console = Console(verbose=is_verbose() if verbose is None else verbose)
    dispatcher = _dispatcher()
    if dispatcher is None:
        console.verbose = True  # Ray prints the workers' lines itself, prefixed
        yield console
        return
    taken = [] if console.verbose else [pair for pair in dispatcher.handlers
                                         if pair[0] == RAY_PRINTER]
    if taken:
        dispatcher.remove_handler(RAY_PRINTER)
    dispatcher.add_handler(OUR_PRINTER, console.handle)
    failed = True
    try:
        yield console
        failed = False
    finally:
        console.settle(3.0 if failed else settle_s)  # a crashed worker never says its last line
        dispatcher.remove_handler(OUR_PRINTER)
        for name, handler in taken:
            dispatcher.add_handler(name, handler)
