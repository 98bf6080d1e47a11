"""What the jobs in ``jobs/`` share: ``--set`` overrides and ``--verbose``; bad input reported
as one line ``JOB: error: ...`` with exit code 2 (argparse mistakes included) before Ray
starts; and the training run to its end, with its closing lines and exit code.

    parser = JobParser(__doc__)
    parser.add_argument("--config", ...)
    try:
        args = parser.parse_args(argv)
        quiet_libraries()                   # unless --verbose / T2T_DIST_VERBOSE=1
        config = prepare(load_config(args.config, overrides=args.overrides))
        preflight(config)
    except INPUT_ERRORS as error:
        return report_input_error("pretrain", error)
    return train_to_end("pretrain", config)
"""

from __future__ import annotations

import argparse
import signal
import sys

import yaml

from t2t_dist.config import Config, ConfigError
from t2t_dist.launch.console import VERBOSE_ENV, set_verbose
from t2t_dist.launch.driver import finished_already, launch, summary
from t2t_dist.launch.stop import RunPreempted, TrainingStopped

# What bad input (flags, config files, --set values, paths, credentials) raises.
INPUT_ERRORS = (ConfigError, ValueError, FileNotFoundError, PermissionError, yaml.YAMLError)


class JobParser(argparse.ArgumentParser):
    """argparse with ``--set SECTION.FIELD=VALUE`` (repeatable, into ``args.overrides``),
    ``--verbose`` (the libraries' logs on the console: ``console.set_verbose``) and one-line
    errors: a mistake raises ``ConfigError`` instead of printing the usage block."""

    def __init__(self, doc: str):
        super().__init__(description=doc.splitlines()[0])
        self.add_argument("--set", dest="overrides", action="append", default=[],
                          metavar="SECTION.FIELD=VALUE", help="override one config value (repeat)")
        self.add_argument("--verbose", action="store_true",
                          help=f"show the libraries' logs too (Ray, DeepSpeed, MLflow; "
                               f"also {VERBOSE_ENV}=1)")

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        set_verbose(parsed.verbose)
        return parsed

    def error(self, message: str):
        raise ConfigError(f"{message} (see --help)")


def report_input_error(job: str, error: BaseException) -> int:
    """Print ``JOB: error: ...`` on one line to stderr; returns the exit code 2."""
    if isinstance(error, (yaml.YAMLError, UnicodeDecodeError)):  # --config or a --set value
        error = f"not valid YAML text in --config or a --set value: {error}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    print(f"{job}: error: {' '.join(lines)}", file=sys.stderr)
    return 2


def train_to_end(job: str, config: Config, tags: dict[str, str] | None = None) -> int:
    """``launch(config)`` and its closing lines; ``tags``: more MLflow tags for the run.
    Exit code: 0 when the schedule ended (or had ended before: one line, nothing started); 1
    when the workers stopped it (a non-finite loss; the last good checkpoint stays the
    latest); 128 + the signal when Ctrl-C, SIGTERM or SIGUSR1 stopped it after a checkpoint
    (130, 143, 138), or Ctrl-C came before training started (130)."""
    done = finished_already(config)
    if done:
        print(f"{job}: {done}", flush=True)
        return 0
    try:
        result = launch(config, tags)
    except RunPreempted as stop:
        print(f"{job}: {stop}", flush=True)
        return 128 + stop.signum
    except TrainingStopped as error:
        print(f"{job}: error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the workers started training: nothing to keep
        print(f"\n{job}: interrupted before training started", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    print(summary(config, result), flush=True)
    return 0
