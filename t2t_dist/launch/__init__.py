"""Everything that imports Ray: the driver, preflight, the parts builder and worker entries.

    config = prepare(load_config(...))     # absolute paths, tracking URI; nothing started yet
    preflight(config)                      # bad model/shards/credentials fail here, in one line
    result = launch(config)                # Ray Train V2 TorchTrainer.fit()
    print(summary(config, result))

Modules: ``job`` (what the scripts in ``jobs/`` share), ``driver`` (prepare, connect, the
TorchTrainer, launch, summary), ``preflight``, ``console`` (what the console shows: our
lines, the libraries' logs with --verbose), ``stop`` (stopping early: stop requests on
Ctrl-C, SIGTERM and SIGUSR1, stop records, ``TrainingStopped``/``RunPreempted``),
``build`` (config -> model, engine, loaders, EMA, checkpointer, tracker: shared by every
worker entry),
``train_worker`` (the training worker's entry point), ``evaluation`` (the evaluation job),
and for sweeps ``sweep`` (trial configs, checked before Ray), ``tune`` (Ray Tune),
``report`` (the sweep's MLflow runs and results) and ``figure`` (its Figure-1 plot).
"""

from t2t_dist.launch.driver import launch, prepare, summary
from t2t_dist.launch.preflight import preflight

__all__ = ["launch", "preflight", "prepare", "summary"]
