"""One checkpointer for everything that must survive a restart: save, publish and restore.

A checkpoint directory holds, written by every rank into its own local folder and merged
by Ray Train into one persistent directory:

    state/                      DeepSpeed: model + every rank's ZeRO optimizer shards
    latest                      DeepSpeed's pointer to ``state``
    client/rank_00000.pt        per rank: step, epoch, data-loader position, RNG states
    ema.pt                      rank 0: the EMA weights (identical on every rank)

    checkpointer = Checkpointer(engine, loader=train_loader, ema=ema, publish=publish)
    checkpointer.commit(step=step, epoch=epoch, metrics=metrics)   # save + hand to Ray Train
    progress = checkpointer.restore(ray.train.get_checkpoint())     # None on a fresh start

``publish(metrics, directory, step)`` is the launcher's hand-over (``ray.train.report`` with
the directory); this module itself imports no ray. ``save``/``load`` work on plain folders.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from t2t_dist import dist
from t2t_dist.optim import WeightEma

DEEPSPEED_TAG = "state"  # one DeepSpeed checkpoint per directory, so a fixed tag


def rng_state() -> dict[str, Any]:
    """Every RNG this process draws from (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def client_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / "client" / f"rank_{rank:05d}.pt"


class Checkpointer:
    """Saves and restores the engine's shards together with the loop's own state.

    ``loader`` and ``ema`` need ``state_dict()/load_state_dict()``; ``ema`` may be None.
    ``save``, ``load``, ``commit`` and ``restore`` are collectives: every rank calls them.
    """

    def __init__(self, engine, *, loader, ema: WeightEma | None = None,
                 publish: Callable[[dict[str, float], Path, int], None] | None = None) -> None:
        self.engine = engine
        self.loader = loader
        self.ema = ema
        self.publish = publish

    def commit(self, *, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """Save this rank's part into a fresh local folder and ``publish`` it (a barrier
        across ranks in Ray Train, which merges the folders); the local copy is then deleted."""
        if self.publish is None:
            raise RuntimeError("Checkpointer.commit needs publish=: the launcher's hand-over")
        directory = Path(tempfile.mkdtemp(prefix=f"t2t-ckpt-{step:08d}-"))
        try:
            self.save(directory, step=step, epoch=epoch)
            self.publish({**metrics, "step": step, "epoch": epoch}, directory, step)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def restore(self, checkpoint) -> dict[str, Any] | None:
        """Load from a Ray Train ``Checkpoint`` (anything with ``as_directory()``); None: fresh."""
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return self.load(directory)

    def save(self, directory: str | Path, *, step: int, epoch: int, **extra: Any) -> Path:
        """Write this rank's part of the checkpoint for ``step`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG,
                                    client_state={"step": step, "epoch": epoch})
        rank = dist.rank()
        client = {"step": step, "epoch": epoch, "loader": self.loader.state_dict(),
                  "rng": rng_state(), "world_size": dist.world_size(), **extra}
        path = client_path(directory, rank)
        path.parent.mkdir(exist_ok=True)
        torch.save(client, path)
        if self.ema is not None and rank == 0:
            torch.save(self.ema.state_dict(), directory / "ema.pt")
        return directory

    def load(self, directory: str | Path) -> dict[str, Any]:
        """Restore engine, loader, RNG and EMA from ``directory``; returns the client state."""
        directory = Path(directory)
        rank = dist.rank()
        path = client_path(directory, rank)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {directory} has no state for rank {rank}: it was "
                                    f"written by a different number of workers")
        client = torch.load(path, weights_only=False)
        if client["world_size"] != dist.world_size():
            raise ValueError(f"checkpoint {directory} was written by {client['world_size']} "
                             f"workers, this run has {dist.world_size()}: expected the same count")
        load_path, _ = self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        if load_path is None:
            raise FileNotFoundError(f"checkpoint {directory} holds no DeepSpeed state "
                                    f"'{DEEPSPEED_TAG}'")
        self.loader.load_state_dict(client["loader"])
        if self.ema is not None:
            self.ema.load_state_dict(torch.load(directory / "ema.pt", weights_only=False))
        set_rng_state(client["rng"])
        return client
