"""Pretrain T2T-ViT with Ray Train + DeepSpeed, logging to MLflow.

    python jobs/pretrain.py --config jobs/configs/demo.yaml
    ray job submit --address http://HEAD:8265 -- python jobs/pretrain.py --model t2t_vit_24 \\
        --config jobs/configs/imagenet_t2t_vit_19_24.yaml --set scaling.num_workers=32

Submitting the same ``run.name`` again resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from t2t_dist.config import load_config
from t2t_dist.launch import prepare, preflight
from t2t_dist.launch.console import quiet_libraries
from t2t_dist.launch.job import INPUT_ERRORS, JobParser, report_input_error, train_to_end

# The embedded default: the digits demo, so a laptop run needs no flags (any --model works).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = JobParser(__doc__)
    parser.add_argument("--config", default=None,
                        help="YAML run config (default: jobs/configs/demo.yaml)")
    parser.add_argument("--model", default=None, help="variant name, e.g. t2t_vit_14")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        quiet_libraries()  # unless --verbose
        config = prepare(load_config(args.config or DEFAULT_CONFIG, model=args.model,
                                     overrides=args.overrides))
        preflight(config)
    except INPUT_ERRORS as error:
        return report_input_error("pretrain", error)
    return train_to_end("pretrain", config)


if __name__ == "__main__":
    sys.exit(main())
