"""Sweep the pretraining job with Ray Tune: each trial a full Ray Train run, logged to MLflow.

    python jobs/sweep.py --config jobs/configs/sweep_hparams.yaml
    python jobs/sweep.py --config jobs/configs/sweep_depth_width.yaml --set scaling.num_workers=8

Running the same command again (same ``tune.name``) continues the sweep: finished trials
are kept, an interrupted trial resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from t2t_dist.config import load_config
from t2t_dist.launch import prepare, preflight
from t2t_dist.launch.job import INPUT_ERRORS, JobParser, report_input_error
from t2t_dist.launch.sweep import check_sweep


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = JobParser(__doc__)
    parser.add_argument("--config", required=True,
                        help="YAML run config with a tune section (jobs/configs/sweep_*.yaml)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        config = prepare(load_config(args.config, overrides=args.overrides))
        preflight(config)
        checked = check_sweep(config)
    except INPUT_ERRORS as error:
        return report_input_error("sweep", error)
    print(f"sweep {config.tune.name}: {checked} value combinations checked", flush=True)
    from t2t_dist.launch.tune import run_sweep  # Ray Tune: ~1.3 s to import, after the checks

    print(run_sweep(config), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
