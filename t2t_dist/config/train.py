"""Optimizer and schedule, DeepSpeed engine, run bookkeeping, and cluster scaling."""

from __future__ import annotations

from dataclasses import dataclass, field

from t2t_dist.config.base import ConfigError, check_choice, check_positive, check_range

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def batch_split(global_batch: int, world_size: int, micro_batch: int = 0) -> tuple[int, int]:
    """``(micro_batch, grad_accum_steps)`` with ``micro * accum * world == global_batch``.

    ``micro_batch=0`` means one forward per step: ``global_batch / world_size`` per worker.
    """
    micro = micro_batch or global_batch // world_size
    if micro <= 0 or global_batch % (micro * world_size):
        raise ConfigError(f"data.global_batch={global_batch} is invalid: expected a multiple of "
                          f"micro_batch({micro}) x workers({world_size})")
    return micro, global_batch // (micro * world_size)


def check_precision_device(precision: str, use_gpu: bool) -> None:
    """fp16 needs GPU workers: there are no CPU fp16 kernels (DeepSpeed refuses it there)."""
    if precision == "fp16" and not use_gpu:
        raise ConfigError("engine.precision='fp16' is invalid on CPU workers: expected 'bf16' or "
                          "'fp32' (or scaling.use_gpu=true)")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    optimizer: str = "adamw"  # "sgd": momentum SGD, the paper's transfer recipe
    lr: float = 5e-4  # at reference_batch; scaled linearly with data.global_batch
    reference_batch: int = 512
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    backbone_lr_scale: float = 1.0  # every parameter but the head trains at lr x this (0.01: transfer)
    epochs: int = 310  # total, cooldown included
    warmup_epochs: float = 10
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: float = 10
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    ema_decay: float = 0.99996  # 0 disables the EMA weights

    def __post_init__(self) -> None:
        check_choice("optim.optimizer", self.optimizer, OPTIMIZERS)
        check_positive("optim.lr", self.lr)
        check_range("optim.momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_range("optim.backbone_lr_scale", self.backbone_lr_scale, 0.0)
        check_positive("optim.reference_batch", self.reference_batch)
        check_range("optim.weight_decay", self.weight_decay, 0.0)
        for i, beta in enumerate(self.betas):
            check_range(f"optim.betas[{i}]", beta, 0.0, 1.0, high_open=True)
        check_positive("optim.eps", self.eps)
        check_positive("optim.epochs", self.epochs)
        check_range("optim.warmup_epochs", self.warmup_epochs, 0.0)
        check_range("optim.cooldown_epochs", self.cooldown_epochs, 0.0)
        check_range("optim.warmup_epochs + optim.cooldown_epochs",
                    self.warmup_epochs + self.cooldown_epochs, high=self.epochs)
        check_range("optim.warmup_lr", self.warmup_lr, 0.0)
        check_range("optim.min_lr", self.min_lr, 0.0)
        check_range("optim.grad_clip", self.grad_clip, 0.0)
        check_range("optim.ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    # 0: every rank holds the whole model and AdamW state (16 bytes per parameter, ~1 GB for
    # t2t_vit_24, the largest): no partitioning work per step. 1-3 partition it over the ranks.
    zero_stage: int = 0
    precision: str = "bf16"
    offload_optimizer: str = "none"
    offload_params: str = "none"  # ZeRO-3 only
    micro_batch: int = 0  # per worker per forward; 0 = global_batch / workers (no accumulation)

    def __post_init__(self) -> None:
        check_choice("engine.zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_choice("engine.precision", self.precision, PRECISIONS)
        check_choice("engine.offload_optimizer", self.offload_optimizer, OFFLOAD_DEVICES)
        check_choice("engine.offload_params", self.offload_params, OFFLOAD_DEVICES)
        check_range("engine.micro_batch", self.micro_batch, 0)
        if self.offload_params != "none" and self.zero_stage != 3:
            check_choice("engine.zero_stage (with offload_params)", self.zero_stage, (3,))
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            check_choice("engine.zero_stage (with offload_optimizer)", self.zero_stage, (1, 2, 3))


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
    # Steps between checks for a stop request (SIGTERM/SIGUSR1 to the job's driver): the
    # workers then commit a checkpoint of that step and the job exits, ready to resume.
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
    num_workers: int = 1
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
        check_positive("scaling.cpus_per_worker", self.cpus_per_worker)
        check_positive("scaling.gpus_per_worker", self.gpus_per_worker)
        check_choice("scaling.placement_strategy", self.placement_strategy,
                     ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
