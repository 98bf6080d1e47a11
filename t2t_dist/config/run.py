"""The ``run`` section (name, storage, cadence of logs, evals and checkpoints, MLflow) and the
``scaling`` section (Ray workers and their resources)."""

from __future__ import annotations

from dataclasses import dataclass, field

from t2t_dist.config.base import check_choice, check_positive, check_range, fail


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    # Submitting the same name again resumes the run. "" = derived from what defines the
    # checkpoint (model, image size, classes), so another --model starts another run.
    name: str = ""
    storage_path: str = "./runs"  # local path, NFS mount or s3://bucket/prefix
    max_steps: int = 0  # stop early after this many optimizer steps; 0 = the full schedule
    log_every: int = 20  # steps
    eval_every: int = 0  # steps; 0 = at each epoch end only
    checkpoint_every: int = 0  # steps; 0 = at each epoch end only
    # Steps between checks for a stop request (Ctrl-C, SIGTERM or SIGUSR1 to the job's
    # driver): the workers then commit a checkpoint of that step and the job exits, ready to
    # resume.
    stop_check_every: int = 10
    keep_checkpoints: int = 2
    max_failures: int = 3  # worker-group restarts Ray Train may make
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "t2t-dist"
    log_model: bool = True  # log consolidated fp32 weights as an MLflow model at the end
    seed: int = 0  # model init and dropout; the data order has data.seed

    def __post_init__(self) -> None:
        if ("/" in self.name or self.name != self.name.strip() or self.name in (".", "..")
                or not self.name.isprintable()):
            check_choice("run.name", self.name, ("a name without '/', control characters or "
                                                 "surrounding spaces, other than '.' and '..'",))
        for name in ("max_steps", "eval_every", "checkpoint_every"):
            check_range(f"run.{name}", getattr(self, name), 0)
        check_positive("run.log_every", self.log_every)
        check_positive("run.stop_check_every", self.stop_check_every)
        check_positive("run.keep_checkpoints", self.keep_checkpoints)
        check_range("run.max_failures", self.max_failures, -1)


@dataclass(frozen=True, kw_only=True)
class ScalingConfig:
    num_workers: int = 1  # the group's size; with min_workers, the most it grows back to
    # Elastic: 1..num_workers. A group that loses workers (a node gone) goes on with the
    # workers left, down to this many, and grows back when resources return, each time from
    # the last checkpoint with the same global batch and schedule. 0 = a fixed group.
    min_workers: int = 0
    resize_check_s: float = 60.0  # elastic: how often a running group looks for room to grow
    # How long a worker group may take to start before Ray Train gives up and decides its
    # size again (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S). Right after a node is lost, Ray may
    # still count its resources and try the old size once: this bounds that wasted attempt.
    start_timeout_s: float = 60.0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used when use_gpu
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    placement_strategy: str = "PACK"
    # "" = $RAY_ADDRESS, else a cluster `ray start`ed on this machine, else a new local Ray;
    # "local" = always a new local Ray; or host:port / ray://host:10001 of a cluster.
    ray_address: str = ""

    def __post_init__(self) -> None:
        check_positive("scaling.num_workers", self.num_workers)
        if isinstance(self.min_workers, bool) or not isinstance(self.min_workers, int) or not (
                0 <= self.min_workers <= self.num_workers):
            fail("scaling.min_workers", self.min_workers, f"0 (a fixed group) or 1 to "
                 f"scaling.num_workers({self.num_workers}) (an elastic group)")
        check_positive("scaling.resize_check_s", self.resize_check_s)
        check_positive("scaling.start_timeout_s", self.start_timeout_s)
        check_positive("scaling.cpus_per_worker", self.cpus_per_worker)
        check_positive("scaling.gpus_per_worker", self.gpus_per_worker)
        check_choice("scaling.placement_strategy", self.placement_strategy,
                     ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
