"""One checkpointer for everything that must survive a restart: save, publish and restore.

What is saved: the DeepSpeed engine (model, optimizer, LR scheduler), the process RNG, and
every entry of one mapping of stateful parts (anything with ``state_dict()`` and
``load_state_dict()``): the loader's position, the samples seen, the EMA weights. A new
piece of training state is one more entry. A checkpoint directory holds, written by every
rank into its own local folder and merged by Ray Train into one persistent directory:

    state/                      DeepSpeed: model + every rank's ZeRO optimizer shards
    latest                      DeepSpeed's pointer to ``state``
    ema.pt                      rank 0: a ``Replicated`` entry (the same on every rank), once
    client/rank_00000.pt        per rank, written last: step, epoch, RNG states, every other
                                entry under its name ("loader", "samples_seen"), and the
                                size of every file this rank wrote (the rank's commit marker)

    ledger = SampleLedger()
    checkpointer = Checkpointer(engine, {"loader": train_loader, "samples_seen": ledger,
                                         "ema": Replicated(ema)}, publish=publish)
    checkpointer.commit(step=step, epoch=epoch, metrics=metrics)   # save + hand to Ray Train
    progress = checkpointer.restore(ray.train.get_checkpoint(), run_checkpoints(...))  # None: fresh

When a checkpoint counts as written: when every rank's commit marker is there and every file
a marker lists has its size (``missing_parts``), whether or not Ray Train registered it. Ray
Train V2 registers a reported checkpoint only once its controller polled every rank's report
(every 2 s); a driver that ends in between (Ctrl-C, a lost head node, a crash) leaves a
complete checkpoint that Ray would never hand back, so ``restore`` looks at every checkpoint
folder of the run (``run_checkpoints``), newest first, and takes the newest complete one. A
torn one (an interrupted save, a truncated or deleted file, a rank's part missing) is passed
over with one line naming it and why.

Another number of workers: ZeRO shards are partitioned by world size, so ``load`` converts
the checkpoint to DeepSpeed's universal format (per-parameter fp32 weights and Adam moments)
in a local temp folder and loads that; the loader's position is global, so the data order
continues exactly. ``publish(metrics, directory, step)`` is the launcher's hand-over
(``ray.train.report``); this module itself imports no ray. ``save``/``load`` work on plain folders.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
import torch

from t2t_dist import dist

DEEPSPEED_TAG = "state"  # one DeepSpeed checkpoint per directory, so a fixed tag
UNIVERSAL_TAG = "state_universal"
CHECKPOINT_PREFIX = "checkpoint_step_"  # Ray Train folder names: checkpoint_step_00000120
FINGERPRINT_MODULUS = 2**31 - 1  # a prime; sums of per-sample fingerprints stay in int64


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


def sample_fingerprints(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One number per sample (B,) from its label and a strided sample of its uint8 pixels.

    Crops are a pure function of (data.seed, epoch, position), so the same sample at the same
    position always gives the same number; sums of these are order-free, so an epoch's sum
    says whether exactly the same multiset of samples was trained on.
    """
    pixels = images.reshape(images.shape[0], -1)[:, ::31].to(torch.int64)  # (B, P)
    weights = (torch.arange(1, pixels.shape[1] + 1, dtype=torch.int64, device=images.device)
               * 2654435761 % 1000003)
    labels = labels.to(images.device, torch.int64)
    return ((pixels * weights).sum(dim=1) * 7 + labels + 1) % FINGERPRINT_MODULUS


class SampleLedger:
    """Training samples seen per epoch, summed over ranks: a count and an order-free fingerprint;
    and the samples the loaders skipped (corrupt, truncated, missing, unlabeled) per epoch.

    ``add`` counts this rank's batches; ``sync`` (a collective, called by every rank through
    ``state_dict`` at each save) folds every rank's new counts into the global totals, so the
    totals carry over to any number of workers. After a full epoch, ``count`` equals the
    epoch's samples and the fingerprint equals an uninterrupted run's: no sample repeated,
    none skipped. ``note_skipped`` records an epoch's skips so far (already summed over ranks),
    so ``skipped_total`` is the run's, across restarts.
    """

    def __init__(self) -> None:
        self.totals: dict[int, list[int]] = {}  # epoch -> [samples, fingerprint sum]
        self.skipped: dict[int, int] = {}  # epoch -> samples skipped, every rank
        # This rank since the last sync: [samples, fingerprint sum], the sum a tensor on the
        # batches' device, so counting GPU-decoded batches never waits for the GPU.
        self._pending: dict[int, list] = {}

    def add(self, epoch: int, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        pending = self._pending.setdefault(epoch, [0, 0])
        for images, labels in batches:
            pending[0] += int(labels.shape[0])
            pending[1] = (pending[1] + sample_fingerprints(images, labels).sum()) % FINGERPRINT_MODULUS

    def note_skipped(self, epoch: int, count: int) -> None:
        """The samples skipped in ``epoch`` so far, summed over ranks (the same on every rank)."""
        self.skipped[epoch] = int(count)

    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def sync(self) -> None:
        """Fold every rank's pending counts into the totals (every rank calls this)."""
        epochs = torch.tensor(sorted(self._pending), dtype=torch.int64)
        # Ranks are in step, so they hold the same epochs; the sum over ranks checks it.
        size = torch.tensor([len(epochs)], dtype=torch.int64)
        dist.all_reduce_sum(size)
        if int(size) != len(epochs) * dist.world_size():
            raise RuntimeError(f"ranks counted samples of different epochs: {epochs.tolist()}")
        counts = torch.tensor([[samples, int(fingerprint)] for samples, fingerprint in
                               (self._pending[int(e)] for e in epochs)], dtype=torch.int64).reshape(-1, 2)
        dist.all_reduce_sum(counts)
        for epoch, (samples, fingerprint) in zip(epochs.tolist(), counts.tolist()):
            total = self.totals.setdefault(epoch, [0, 0])
            total[0] += samples
            total[1] = (total[1] + fingerprint) % FINGERPRINT_MODULUS
        self._pending.clear()

    def count(self, epoch: int) -> int:
        return self.totals.get(epoch, [0, 0])[0]

    def state_dict(self) -> dict[int, dict[str, int]]:
        """The totals over every rank, pending counts folded in first (a collective: ``sync``)."""
        self.sync()
        return {epoch: {"samples": n, "fingerprint": f, "skipped": self.skipped.get(epoch, 0)}
                for epoch, (n, f) in self.totals.items()}

    def load_state_dict(self, state: dict[int, dict[str, int]]) -> None:
        self.totals = {int(e): [v["samples"], v["fingerprint"]] for e, v in state.items()}
        self.skipped = {int(e): int(v.get("skipped", 0)) for e, v in state.items()}
        self._pending.clear()


def checkpoint_folder_name(step: int, taken: Collection[str] = ()) -> str:
    """``checkpoint_step_00000120``, or ``checkpoint_step_00000120.1`` (``.2``, ...) when a
    restore passed over a checkpoint of that name (``taken``). Ray Train may hold the passed-over
    one registered; registering a second checkpoint in the same folder makes it delete that
    folder twice when both age out, and its controller fails the run on the second delete."""
    name = f"{CHECKPOINT_PREFIX}{step:08d}"
    attempt = 0
    while (f"{name}.{attempt}" if attempt else name) in taken:
        attempt += 1
    return f"{name}.{attempt}" if attempt else name


def checkpoint_step(name: str) -> int:
    """The step of a checkpoint folder name: ``checkpoint_step_00000120(.1)`` -> 120."""
    return int(name[len(CHECKPOINT_PREFIX):].split(".")[0])


def written_files(directory: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``directory``."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size
            for p in sorted(directory.rglob("*")) if p.is_file()}


class _Files:
    """Read access to a checkpoint folder: a local one, or a path on a pyarrow filesystem
    (Ray Train's storage: local, NFS or S3), read in place without downloading the checkpoint."""

    def __init__(self, directory: str | Path, filesystem=None) -> None:
        self.directory, self.filesystem = directory, filesystem
        self._sizes: dict[str, int] | None = None

    def read(self, name: str) -> bytes:
        if self.filesystem is None:
            return (Path(self.directory) / name).read_bytes()
        with self.filesystem.open_input_stream(f"{self.directory}/{name}") as stream:
            return stream.read()

    def sizes(self) -> dict[str, int]:
        """Relative path -> size of every file (one listing)."""
        if self._sizes is None:
            if self.filesystem is None:
                self._sizes = written_files(Path(self.directory))
            else:
                from pyarrow.fs import FileSelector, FileType  # Ray's dependency: its storage

                root = str(self.directory).rstrip("/")
                found = self.filesystem.get_file_info(FileSelector(root, recursive=True,
                                                                   allow_not_found=True))
                self._sizes = {info.path[len(root) + 1:]: info.size for info in found
                               if info.type == FileType.File}
        return self._sizes


def missing_parts(directory: str | Path, filesystem=None) -> str:
    """Why ``directory`` is not a complete checkpoint ("" when it is): a rank's marker missing
    or unreadable, or a file a rank wrote missing or of another size (truncated).

    ``filesystem``: a pyarrow filesystem ``directory`` is a path on (read in place: the
    markers and one listing); None: a local folder.
    """
    files = _Files(directory, filesystem)

    def marker(rank: int) -> dict[str, Any]:
        name = client_path("", rank).as_posix()
        return torch.load(io.BytesIO(files.read(name)), weights_only=False)

    try:
        first = marker(0)
    except Exception as error:  # missing, truncated or garbage: pickle raises many kinds
        return f"rank 0's part is missing or unreadable ({type(error).__name__})"
    for rank in range(first["world_size"]):
        try:
            client = first if rank == 0 else marker(rank)
        except Exception as error:
            return f"rank {rank}'s part is missing or unreadable ({type(error).__name__})"
        for name, size in client.get("files", {}).items():
            found = files.sizes().get(name)
            if found is None:
                return f"{name} (rank {rank}) is missing"
            if found != size:
                return f"{name} (rank {rank}) has {found} bytes, expected {size}"
    return ""


def run_checkpoints(folder: str, filesystem, make: Callable[[str], Any]) -> list:
    """Every ``checkpoint_step_*`` folder of a run, newest first, as ``make(path)``.

    ``folder`` is the run's folder on ``filesystem`` (a pyarrow filesystem: local, NFS or S3),
    where Ray Train keeps its checkpoints side by side (``storage_path/name/checkpoint_step_*``).
    What Ray Train registered is not consulted: a checkpoint every rank completed counts even
    when the driver ended before the controller registered it.
    """
    from pyarrow.fs import FileSelector, FileType  # Ray's dependency, not ours: its storage

    folder = str(folder).rstrip("/")
    found = filesystem.get_file_info(FileSelector(folder, allow_not_found=True))
    names = sorted((info.base_name for info in found if info.type == FileType.Directory
                    and info.base_name.startswith(CHECKPOINT_PREFIX)), reverse=True)
    return [make(f"{folder}/{name}") for name in names]


def older_checkpoints(checkpoint) -> list:
    """The checkpoints of the same run older than ``checkpoint`` (a Ray Train ``Checkpoint``:
    ``path`` on ``filesystem``), newest first, built with the checkpoint's own class."""
    path, filesystem = getattr(checkpoint, "path", None), getattr(checkpoint, "filesystem", None)
    if path is None or filesystem is None:
        return []
    parent, _, name = str(path).rstrip("/").rpartition("/")
    return [older for older in run_checkpoints(
        parent, filesystem, lambda where: type(checkpoint)(path=where, filesystem=filesystem))
        if older.path.rpartition("/")[2] < name]


def checkpoint_name(checkpoint) -> str:
    """``checkpoint_step_00000120`` for a checkpoint (anything with ``path``) or folder."""
    return str(getattr(checkpoint, "path", checkpoint)).rstrip("/").rpartition("/")[2]


def convert_to_universal(directory: Path, output: Path) -> None:
    """DeepSpeed's universal checkpoint of ``directory/state`` in ``output/state_universal``.

    ``inject_missing_state`` adds the ``universal_checkpoint_info`` ZeRO-1/2 checkpoints lack;
    one extract worker (no process pool inside a Ray worker). DeepSpeed's progress prints are
    kept out of the job's output.
    """
    from deepspeed.checkpoint import ds_to_universal  # ~1.2 s: another world size only

    args = argparse.Namespace(input_folder=str(directory / DEEPSPEED_TAG),
                              output_folder=str(output / UNIVERSAL_TAG), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)


class Replicated:
    """A checkpointed part that is the same on every rank (the EMA weights): rank 0 saves it
    once, as ``<name>.pt`` beside the DeepSpeed state, and every rank loads that file."""

    def __init__(self, part: Any) -> None:
        self.part = part

    def state_dict(self) -> Any:
        return self.part.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.part.load_state_dict(state)


# What the checkpointer itself writes into a rank's client file; no part may take these names.
CLIENT_KEYS = ("step", "epoch", "rng", "world_size", "zero_stage", "files")


class Checkpointer:
    """Saves and restores the engine's shards, the process RNG and the ``states`` together.

    ``states`` maps a name to a part with ``state_dict()/load_state_dict()``; None values are
    left out. Each rank saves a part's state in its client file under the name; a
    ``Replicated`` part goes to its own file, from rank 0. ``save``, ``load``, ``commit`` and
    ``restore`` are collectives: every rank calls them, and a part's ``state_dict()`` may be
    one too (``SampleLedger`` sums over ranks), so parts are saved in the mapping's order.
    """

    def __init__(self, engine, states: Mapping[str, Any] | None = None, *,
                 publish: Callable[[dict[str, float], Path, str], None] | None = None) -> None:
        self.engine = engine
        self.states = {name: part for name, part in (states or {}).items() if part is not None}
        taken = sorted(set(self.states) & set(CLIENT_KEYS))
        if taken:
            raise ValueError(f"checkpoint state names {taken} are taken: expected names other "
                             f"than {', '.join(CLIENT_KEYS)}")
        self.publish = publish
        self.passed_over: set[str] = set()  # folder names ``restore`` skipped (torn, unreadable)

    def commit(self, *, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """Save this rank's part into a fresh local folder and ``publish`` it (a barrier
        across ranks in Ray Train, which merges the folders); the local copy is then deleted."""
        if self.publish is None:
            raise RuntimeError("Checkpointer.commit needs publish=: the launcher's hand-over")
        directory = Path(tempfile.mkdtemp(prefix=f"t2t-ckpt-{step:08d}-"))
        try:
            self.save(directory, step=step, epoch=epoch)
            self.publish({**metrics, "step": step, "epoch": epoch}, directory,
                         checkpoint_folder_name(step, self.passed_over))
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def restore(self, checkpoint, candidates: Sequence | None = None) -> dict[str, Any] | None:
        """Load the newest complete checkpoint of the run; returns its client state, None on a
        fresh start (no checkpoint at all).

        ``checkpoint`` is the one Ray Train registered last (a ``Checkpoint``: anything with
        ``as_directory()``; None when none was). ``candidates`` are every checkpoint of the run
        in storage, newest first (``run_checkpoints``); default: ``checkpoint`` and its older
        siblings. A checkpoint every rank completed (its commit markers say so) counts even
        when Ray Train never registered it: the driver may have ended (Ctrl-C, a lost head
        node, a crash) between the workers' save and the controller's poll. One that is torn
        or unreadable is passed over with a one-line warning naming it and why, and the next
        older one is tried; every rank decides the same (the verdict is all-reduced).
        """
        if candidates is None:
            candidates = [checkpoint, *older_checkpoints(checkpoint)] if checkpoint else []
        candidates = list(candidates) or ([checkpoint] if checkpoint is not None else [])
        if not candidates:
            return None
        registered = checkpoint_name(checkpoint) if checkpoint is not None else ""
        skipped = []
        for candidate in candidates:
            name = str(getattr(candidate, "path", candidate))
            filesystem = getattr(candidate, "filesystem", None)
            # Checked in place first: a torn checkpoint in S3 is never downloaded.
            problem = missing_parts(name, filesystem) if filesystem is not None else ""
            client = None
            if not problem:
                with candidate.as_directory() as directory:
                    problem = missing_parts(directory)
                    if not problem:
                        try:
                            client = self.load(directory)
                        except Exception as error:  # a corrupt file of the right size
                            problem = f"loading failed: {type(error).__name__}: {error}"
            failed = torch.tensor([1 if problem else 0])
            dist.all_reduce_sum(failed)
            if not int(failed):
                if checkpoint_name(candidate) > registered:
                    dist.say(f"resuming from {name}: every rank completed it, though Ray Train "
                             f"had registered {registered or 'no checkpoint'} when the run "
                             f"stopped (the driver ended first)")
                return client
            dist.say(f"skipping checkpoint {name}: {problem or 'another rank could not load it'}; "
                     f"trying the previous one", warning=True)
            skipped.append(name)
            self.passed_over.add(checkpoint_name(candidate))
        raise RuntimeError(f"no usable checkpoint: {', '.join(skipped)} are all torn or "
                           f"unreadable; remove them to start the run over")

    def save(self, directory: str | Path, *, step: int, epoch: int) -> Path:
        """Write this rank's part of the checkpoint for ``step`` into ``directory``, its
        client state (the commit marker listing the rank's files) last."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        rank = dist.rank()
        own = {name: part.state_dict() for name, part in self.states.items()
               if not isinstance(part, Replicated)}
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG,
                                    client_state={"step": step, "epoch": epoch})
        if rank == 0:
            for name, part in self.states.items():
                if isinstance(part, Replicated):
                    torch.save(part.state_dict(), directory / f"{name}.pt")
        client = {"step": step, "epoch": epoch, **own, "rng": rng_state(),
                  "world_size": dist.world_size(),
                  "zero_stage": self.engine.zero_optimization_stage(),
                  "files": written_files(directory)}
        path = client_path(directory, rank)
        path.parent.mkdir(exist_ok=True)
        temporary = path.with_suffix(".tmp")
        torch.save(client, temporary)
        temporary.rename(path)
        return directory

    def load(self, directory: str | Path) -> dict[str, Any]:
        """Restore the engine, every part of ``states`` and the RNG from ``directory``; returns
        the client state. Written by another number of workers: through a universal checkpoint.
        A part the checkpoint has no state for (one added since) keeps its fresh state."""
        directory = Path(directory)
        rank, world = dist.rank(), dist.world_size()
        first = torch.load(client_path(directory, 0), weights_only=False)
        saved_world = first["world_size"]
        # Another world size: rank r takes the RNG of saved rank r (or rank 0 beyond them).
        own = client_path(directory, rank if rank < saved_world else 0)
        client = torch.load(own, weights_only=False)
        if saved_world == world or first.get("zero_stage", self.engine.zero_optimization_stage()) == 0:
            self._load_engine(directory, DEEPSPEED_TAG)  # ZeRO-0 keeps whole optimizer states
        else:
            with tempfile.TemporaryDirectory(prefix="t2t-universal-") as scratch:
                convert_to_universal(directory, Path(scratch))
                self._load_engine(Path(scratch), UNIVERSAL_TAG, universal=True)
            self._load_frozen(directory)
        for name, part in self.states.items():
            if isinstance(part, Replicated):
                part.load_state_dict(torch.load(directory / f"{name}.pt", weights_only=False))
            elif name in client:
                part.load_state_dict(client[name])
            else:
                dist.say(f"checkpoint {directory} holds no {name!r} state: it starts fresh", warning=True)
        set_rng_state(client["rng"])  # last: loading must not shift the restored streams
        return {**client, "resumed_world_size": saved_world}

    def _load_frozen(self, directory: Path) -> None:
        """Frozen parameters (the performer's random features) and buffers, which a universal
        load leaves as initialized: taken from the consolidated checkpoint."""
        # deepspeed: ~1.2 s to import; only a load on another world size gets here.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if self.engine.zero_optimization_stage() < 3:  # rank 0 saved the whole module
            full = torch.load(directory / DEEPSPEED_TAG / "mp_rank_00_model_states.pt",
                              map_location="cpu", weights_only=False)["module"]
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                full = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        module = self.engine.module
        frozen = [(name, param) for name, param in module.named_parameters() if not param.requires_grad]
        gather = contextlib.nullcontext()
        if self.engine.zero_optimization_stage() == 3 and frozen:
            # Not at this module's top: export and the CLI import it, and DeepSpeed reads
            # DS_ACCELERATOR when first imported (~1.2 s).
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for _, p in frozen], modifier_rank=0)
        with torch.no_grad(), gather:
            for name, tensor in [*frozen, *module.named_buffers()]:
                if name in full:
                    tensor.copy_(full[name].to(tensor.dtype))

    def _load_engine(self, directory: Path, tag: str, *, universal: bool = False) -> None:
        """DeepSpeed's ``load_checkpoint``; ``universal`` is switched on only for this load
        (left on, the next ordinary checkpoint would not load)."""
        config = self.engine._config
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = universal
        groups = getattr(self.engine.optimizer, "param_groups", None) or []
        settings = [{key: value for key, value in group.items() if key != "params"}
                    for group in groups]
        try:
            load_path, _ = self.engine.load_checkpoint(str(directory), tag=tag)
        finally:
            config.load_universal_checkpoint = before
        # The load brings the saved param-group settings, and ZeRO-3's universal load gives
        # every group the first group's (weight decay on biases and norms): this run's config
        # decides them (weight decay, betas, LR scale), as it did before the load.
        for group, kept in zip(getattr(self.engine.optimizer, "param_groups", None) or [], settings):
            group.update(kept)
        # ZeRO-3's universal load hands every param group's state one shared ``step`` tensor;
        # torch's AdamW increments it in place once per group, so with two groups (decay, no
        # decay) the count ran ahead by one per group per step and the bias correction with
        # it: the 4.5e-5 loss gap of ZeRO-3 resumes. Each state gets its own count.
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        for state in getattr(base, "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        if load_path is None:
            raise FileNotFoundError(f"checkpoint {directory} holds no DeepSpeed state '{tag}'")
