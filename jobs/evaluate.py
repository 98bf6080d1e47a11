"""Evaluate weights on validation shards with Ray workers: top-1, top-5 and loss, to stdout and MLflow.

    python jobs/evaluate.py --checkpoint runs/demo                      # a run: its latest checkpoint
    python jobs/evaluate.py --checkpoint runs/demo/checkpoint_step_00000230 --set scaling.num_workers=1
    python jobs/evaluate.py --model t2t_vit_14 --checkpoint 81.5_T2T_ViT_14.pth.tar \\
        --data 's3://imagenet/val/imagenet1k-val-{0000..0049}.tar' --set scaling.use_gpu=true
    python jobs/evaluate.py --model t2t_vit_mini --checkpoint models:/digits@candidate --data ...

Every validation sample is counted once, whatever the worker count. A checkpoint of one of
our runs brings its run's config (model, eval batch and crop, precision); ``--set`` changes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from t2t_dist.launch import prepare
from t2t_dist.launch.console import quiet_libraries
from t2t_dist.launch.job import INPUT_ERRORS, JobParser, report_input_error
from t2t_dist.launch.evaluation import (evaluation_config, format_evaluation, launch_evaluation,
                                        materialize_weights, preflight_evaluation)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = JobParser(__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="weights file, run checkpoint folder, run name, or MLflow model URI")
    parser.add_argument("--model", default=None, help="variant name, e.g. t2t_vit_14")
    parser.add_argument("--data", default=None, help="validation shard URLs (data.val_urls)")
    parser.add_argument("--config", default=None, help="YAML config (default: the run's own)")
    parser.add_argument("--ema", action="store_true", help="the EMA weights (evaluated in fp32)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        quiet_libraries()  # unless --verbose
        config = prepare(evaluation_config(args.checkpoint, config_path=args.config,
                                           model=args.model, data=args.data,
                                           overrides=args.overrides))
        if args.ema:  # the in-training EMA evaluation runs in fp32
            config = dataclasses.replace(config, engine=dataclasses.replace(
                config.engine, precision="fp32"))
        preflight_evaluation(config)
        config, weights = materialize_weights(config, args.checkpoint, new_head=False, ema=args.ema)
    except INPUT_ERRORS as error:
        return report_input_error("evaluate", error)
    metrics = launch_evaluation(config, weights, ema=args.ema)
    print(format_evaluation(config, weights, metrics), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
