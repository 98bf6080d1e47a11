"""Rank and world facts in one place; every function also works with no process group."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as torch_dist


def _initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    if _initialized():
        return torch_dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if _initialized():
        return torch_dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Rank 0: the one process that writes MLflow records and other side effects."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (identity without a process group)."""
    if _initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


# What rank 0 prints for the user starts with this mark: the driver's console shows marked
# lines (without it) and, unless --verbose, nothing else of what the workers print
# (``launch.console``). Ray forwards a worker's stdout and stderr to the driver line by line.
CONSOLE_MARK = "[t2t-dist] "
CONSOLE_END = CONSOLE_MARK + "(end of output)"  # a worker's last line: the console may close


def say(line: str, *, warning: bool = False) -> None:
    """Rank 0 prints ``line`` for the user (``warning``: to stderr, as ``WARNING: ...``).

    Written to the stream directly: Ray Train patches ``print`` in its workers to tee into its
    logger as well, which shows every line twice on the driver.
    """
    if not is_main():
        return
    stream = sys.stderr if warning else sys.stdout
    stream.write(f"{CONSOLE_MARK}{'WARNING: ' if warning else ''}{line}\n")
    stream.flush()


def say_end() -> None:
    """Rank 0's last line: everything it said before has been written (see ``CONSOLE_END``)."""
    if is_main():
        sys.stdout.write(CONSOLE_END + "\n")
        sys.stdout.flush()
