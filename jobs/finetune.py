"""Fine-tune T2T-ViT with Ray Train + DeepSpeed: transfer to another data set (new head,
resized pos_embed, SGD with backbone LR x0.01) or to another image size (384 from 224).

    python jobs/finetune.py --config jobs/configs/finetune_cifar10.yaml --pretrained 81.5_T2T_ViT_14.pth.tar
    python jobs/finetune.py --config jobs/configs/finetune_digits.yaml --pretrained t2t_vit_mini-32px-10cls \\
        --train-folder five_digits/train --val-folder five_digits/val
    python jobs/finetune.py --config jobs/configs/finetune_384.yaml --pretrained models:/t2t14@candidate

``--pretrained`` (or ``model.pretrained``): a released file, one of our runs or checkpoints
(ZeRO shards, consolidated once on the driver), or an MLflow model URI. ``--train-folder`` /
``--val-folder``: ImageFolder trees, written to shards under the run's storage first.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from t2t_dist.config import ConfigError, load_config, run_dir
from t2t_dist.data import manifest_pattern, write_shards
from t2t_dist.launch import prepare, preflight
from t2t_dist.launch.console import quiet_libraries
from t2t_dist.launch.evaluation import materialize_weights, weights_tags
from t2t_dist.launch.job import INPUT_ERRORS, JobParser, report_input_error, train_to_end

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "finetune_digits.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = JobParser(__doc__)
    parser.add_argument("--config", default=None, help="YAML run config (default: finetune_digits)")
    parser.add_argument("--model", default=None, help="variant name, e.g. t2t_vit_14")
    parser.add_argument("--pretrained", default=None, help="weights to start from (model.pretrained)")
    parser.add_argument("--train-folder", default=None, help="ImageFolder tree of training images")
    parser.add_argument("--val-folder", default=None, help="ImageFolder tree of validation images")
    return parser.parse_args(argv)


def shards_from_folders(config, train_folder: str, val_folder: str):
    """Write both trees as shards under ``<run_dir>/data/`` and read those."""
    root = f"{run_dir(config)}/data"
    urls = {}
    for split, folder in (("train", train_folder), ("val", val_folder)):
        manifest = write_shards(folder, f"{root}/{split}", prefix=split, samples_per_shard=1000,
                                processes=1)
        urls[split] = (manifest_pattern(f"{root}/{split}", manifest), manifest["classes"])
    if urls["train"][1] != urls["val"][1]:
        raise ConfigError(f"--val-folder {val_folder!r} has classes {urls['val'][1][:5]}...: "
                          f"expected those of --train-folder ({urls['train'][1][:5]}...)")
    data = dataclasses.replace(config.data, train_urls=urls["train"][0], val_urls=urls["val"][0])
    return dataclasses.replace(config, data=data)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        quiet_libraries()  # unless --verbose
        overrides = args.overrides + ([f"model.pretrained={args.pretrained}"] if args.pretrained
                                      else [])
        config = load_config(args.config or DEFAULT_CONFIG, model=args.model, overrides=overrides)
        source = config.model.pretrained  # resolved below, not as a path of this directory
        if not source:
            raise ConfigError("model.pretrained is empty: expected --pretrained with a weights "
                              "file, a run (name or folder), a checkpoint or an MLflow model URI")
        config = prepare(dataclasses.replace(config, model=dataclasses.replace(
            config.model, pretrained=None)))
        if bool(args.train_folder) != bool(args.val_folder):
            raise ConfigError("--train-folder and --val-folder go together: expected both")
        if args.train_folder:
            config = shards_from_folders(config, args.train_folder, args.val_folder)
        config, weights = materialize_weights(config, source, new_head=True)
        preflight(config)
    except INPUT_ERRORS as error:
        return report_input_error("finetune", error)
    print(f"fine-tuning {config.model.name} from {weights.source}", flush=True)
    return train_to_end("finetune", config, weights_tags(config, weights))


if __name__ == "__main__":
    sys.exit(main())
