"""Everything that imports Ray: the driver, preflight, the parts builder and worker entries.

    config = prepare(load_config(...))     # absolute paths, tracking URI; nothing started yet
    preflight(config)                      # bad model/shards/credentials fail here, in one line
    result = launch(config)                # Ray Train V2 TorchTrainer.fit()
    print(summary(config, result))

Modules: ``driver`` (prepare, connect, trainer, stop on SIGTERM/SIGUSR1, summary),
``preflight``, ``build`` (config -> model, engine, loaders, EMA, checkpointer, tracker: shared
by every worker entry), ``train`` (the training worker's entry point), ``evaluate``, ``tune``
and ``report`` (sweeps), and ``job`` (what the scripts in ``jobs/`` share).
"""

from t2t_dist.launch.driver import launch, prepare, summary
from t2t_dist.launch.preflight import preflight

__all__ = ["launch", "preflight", "prepare", "summary"]
