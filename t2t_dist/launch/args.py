"""What the jobs in ``jobs/`` share on their command line: ``--set`` overrides, and bad input
reported as one line ``JOB: error: ...`` with exit code 2 (argparse mistakes included), before
Ray starts.

    parser = JobParser(__doc__)
    parser.add_argument("--config", ...)
    try:
        args = parser.parse_args(argv)
        config = prepare(load_config(args.config, overrides=args.overrides))
    except INPUT_ERRORS as error:
        return report_input_error("pretrain", error)
"""

from __future__ import annotations

import argparse
import sys

import yaml

from t2t_dist.config import ConfigError

# What bad input (flags, config files, --set values, paths, credentials) raises.
INPUT_ERRORS = (ConfigError, ValueError, FileNotFoundError, PermissionError, yaml.YAMLError)


class JobParser(argparse.ArgumentParser):
    """argparse with ``--set SECTION.FIELD=VALUE`` (repeatable, into ``args.overrides``) and
    one-line errors: a mistake raises ``ConfigError`` instead of printing the usage block."""

    def __init__(self, doc: str):
        super().__init__(description=doc.splitlines()[0])
        self.add_argument("--set", dest="overrides", action="append", default=[],
                          metavar="SECTION.FIELD=VALUE", help="override one config value (repeat)")

    def error(self, message: str):
        raise ConfigError(f"{message} (see --help)")


def report_input_error(job: str, error: BaseException) -> int:
    """Print ``JOB: error: ...`` on one line to stderr; returns the exit code 2."""
    if isinstance(error, (yaml.YAMLError, UnicodeDecodeError)):  # --config or a --set value
        error = f"not valid YAML text in --config or a --set value: {error}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    print(f"{job}: error: {' '.join(lines)}", file=sys.stderr)
    return 2
