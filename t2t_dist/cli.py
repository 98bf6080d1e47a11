"""The ``t2t-dist`` command: the model table, shards, weight export, sweep reports
(``DESCRIPTION``, what ``--help`` shows). Training runs through ``jobs/``.

Each command imports what it runs when it runs (torch, webdataset, MLflow: a second or more
each), so ``t2t-dist --help`` and a mistyped command answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from tqdm import tqdm

from t2t_dist.config import ConfigError, ModelConfig

PROGRESS_EVERY_S = 30.0  # shards write/check: seconds between progress lines in logs
DESCRIPTION = ("t2t-dist tools: the table of model variants, writing and checking WebDataset "
               "shards, exporting a run's weights (and registering them in MLflow), and the "
               "results of sweeps. Training, fine-tuning, evaluation and sweeps run through the "
               "scripts in jobs/ (python jobs/pretrain.py --help).")


def _models(args: argparse.Namespace) -> None:
    from t2t_dist.models import format_model_table  # torch

    print(format_model_table(args.names or None))


class _ProgressLines:
    """A tqdm stand-in for logs (stderr not a terminal): one line every ``every`` seconds, with
    the count, rate and ETA tqdm would show, and a last line on ``close()``."""

    def __init__(self, desc: str, every: float):
        self.desc, self.every, self.n, self.total = desc, every, 0, None
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._print(now)

    def close(self) -> None:
        self._print(time.monotonic())

    def _print(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        line = f"{self.desc}: {self.n:,}"
        if self.total:
            line += f"/{self.total:,} images ({100 * self.n / self.total:.0f}%)"
        else:
            line += " images"
        line += f", {rate:.1f} img/s, elapsed {tqdm.format_interval(elapsed)}"
        if self.total and rate > 0:
            line += f", ETA {tqdm.format_interval((self.total - self.n) / rate)}"
        print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _progress(desc: str, every: float):
    """A tqdm bar (images/s, ETA) on a terminal, else ``_ProgressLines``; none if every <= 0."""
    if every <= 0:
        yield None
        return
    if sys.stderr.isatty():
        bar = tqdm(desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
    else:
        bar = _ProgressLines(desc, every)
    try:
        yield bar
    finally:
        bar.close()


def _shards_write(args: argparse.Namespace) -> None:
    from t2t_dist.data import bad_files_url, manifest_pattern, write_shards  # torch

    with _progress("shards write", args.progress_every) as progress:
        manifest = write_shards(args.src, args.dest, prefix=args.prefix,
                                samples_per_shard=args.samples_per_shard, max_side=args.max_side,
                                processes=args.processes, shuffle_seed=args.seed,
                                strict=args.strict, progress=progress)
    bad = manifest["bad_files"]
    print(f"wrote {manifest['num_samples']} samples of {len(manifest['classes'])} classes "
          f"in {len(manifest['shards'])} shards, skipped {bad} bad files"
          f"{f' (see {bad_files_url(args.dest, args.prefix)})' if bad else ''}: "
          f"{manifest_pattern(args.dest, manifest)}")


def _shards_check(args: argparse.Namespace) -> None:
    from t2t_dist.data import check_shards  # torch

    with _progress("shards check", args.progress_every) as progress:
        report = check_shards(args.urls, write_manifest=args.write_manifest, progress=progress)
    print(report)
    if not report.ok:
        sys.exit(1)


def _shards_digits(args: argparse.Namespace) -> None:
    from t2t_dist.data import make_digits_dataset  # torch, scikit-learn

    urls = make_digits_dataset(args.dest, img_size=args.img_size)
    print(f"digits shards: train={urls['train']} val={urls['val']}")


def _sweep_report(args: argparse.Namespace) -> None:
    from t2t_dist.launch.report import sweep_report  # torch, MLflow
    from t2t_dist.tracking import resolve_tracking_uri

    print(sweep_report(args.name, resolve_tracking_uri(args.tracking_uri)))


def _export(args: argparse.Namespace) -> None:
    from t2t_dist.export import register_model, released_state_dict, resolve_weights, save_weights
    from t2t_dist.tracking import resolve_tracking_uri  # with export: torch

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    weights = resolve_weights(args.source, storage_path=args.storage_path,
                              tracking_uri=tracking_uri, ema=args.ema)
    model_config = weights.model_config
    if args.model:
        if model_config is not None and model_config.name != args.model:
            raise ValueError(f"checkpoint {weights.source!r} is a {model_config.name} checkpoint, "
                             f"not --model {args.model!r}: expected --model {model_config.name}")
        model_config = model_config or ModelConfig(name=args.model, img_size=args.img_size,
                                                   num_classes=args.num_classes)
    if args.register and model_config is None:
        raise ValueError(f"--register needs the variant of {args.source!r}: expected --model NAME "
                         f"(with --img-size/--num-classes)")
    state = released_state_dict(weights, model_config)
    kind = "EMA" if args.ema else "fp32 master"
    metadata = {"source": weights.source, "weights": kind,
                "model": model_config.name if model_config else "unknown"}
    out = save_weights(state, args.out, args.format, metadata=metadata)
    print(f"wrote {len(state)} tensors ({sum(t.numel() for t in state.values()):,} values, "
          f"{kind} weights of {weights.source}) to {out}")
    if args.register:
        version, uri = register_model(state, model_config=model_config, name=args.register,
                                      alias=args.alias, tracking_uri=tracking_uri,
                                      experiment=args.experiment,
                                      tags={"source": weights.source, "weights": kind})
        print(f"registered {args.register} version {version} as {uri} at {tracking_uri}")


def _add_progress_every(parser: argparse.ArgumentParser) -> None:
    """``--progress-every SECONDS`` of the long shard commands (write, check)."""
    parser.add_argument("--progress-every", type=float, default=PROGRESS_EVERY_S, metavar="SECONDS",
                        help="when stderr is not a terminal, a progress line every SECONDS "
                             "(0: none); on a terminal, a progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2t-dist", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="table of model variants: params, GMACs, paper")
    models.add_argument("names", nargs="*", help="variants to show (default: all)")
    models.set_defaults(func=_models)

    shards = commands.add_parser("shards", help="write and check WebDataset shards")
    shard_commands = shards.add_subparsers(dest="shards_command", required=True)
    write = shard_commands.add_parser("write", help="ImageFolder tree -> tar shards (+ manifest)")
    write.add_argument("src", help="folder with one sub-folder of JPEGs per class")
    write.add_argument("dest", help="local folder or s3://bucket/prefix")
    write.add_argument("--prefix", default="imagenet1k-train", help="shard name prefix")
    write.add_argument("--samples-per-shard", type=int, default=1000)
    write.add_argument("--max-side", type=int, default=None,
                       help="pre-resize so the shorter side is at most this many pixels")
    write.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    write.add_argument("--seed", type=int, default=0, help="seed of the cross-shard shuffle")
    write.add_argument("--strict", action="store_true",
                       help="stop at the first file that is not a usable image (default: skip "
                            "it and list it in <prefix>.bad-files.json beside the manifest)")
    _add_progress_every(write)
    write.set_defaults(func=_shards_write)
    check = shard_commands.add_parser("check", help="read shards back and report")
    check.add_argument("urls", help="e.g. s3://bucket/train/imagenet1k-train-{0000..1023}.tar")
    check.add_argument("--write-manifest", action="store_true",
                       help="write the manifest readers need (for shards made by other tools)")
    _add_progress_every(check)
    check.set_defaults(func=_shards_check)
    digits = shard_commands.add_parser("digits", help="scikit-learn digits as demo shards")
    digits.add_argument("dest", help="local folder or s3://bucket/prefix")
    digits.add_argument("--img-size", type=int, default=64, help="side of the upscaled JPEGs")
    digits.set_defaults(func=_shards_digits)

    export = commands.add_parser("export", help="consolidate a run's weights into one file "
                                                "(released layout), optionally register in MLflow")
    export.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                        help="run name or folder, checkpoint folder, weights file or MLflow URI")
    export.add_argument("out", help="output file (.pt or .safetensors)")
    export.add_argument("--ema", action="store_true", help="the EMA weights instead of the raw")
    export.add_argument("--format", choices=("pt", "safetensors"), default="",
                        help="default: by the output file name")
    export.add_argument("--storage-path", default="./runs", help="where run names are looked up")
    export.add_argument("--model", default=None,
                        help="variant, when the source does not carry its run config")
    export.add_argument("--img-size", type=int, default=224, help="with --model")
    export.add_argument("--num-classes", type=int, default=1000, help="with --model")
    export.add_argument("--register", metavar="NAME", default=None,
                        help="also log to the MLflow model registry under NAME")
    export.add_argument("--alias", default="candidate", help="registry alias of the new version")
    export.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI or "
                                                           "sqlite:///mlflow.db")
    export.add_argument("--experiment", default="t2t-dist-export")
    export.set_defaults(func=_export)

    sweep = commands.add_parser("sweep", help="results of Ray Tune sweeps (jobs/sweep.py)")
    sweep_commands = sweep.add_subparsers(dest="sweep_command", required=True)
    report = sweep_commands.add_parser("report", help="results table from MLflow, best first, "
                                                      "the plot's and best config's paths and "
                                                      "the command that trains the best trial")
    report.add_argument("name", help="the sweep's tune.name")
    report.add_argument("--tracking-uri", default="", help="default: $MLFLOW_TRACKING_URI or "
                                                           "sqlite:///mlflow.db")
    report.set_defaults(func=_sweep_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        sys.exit(f"t2t-dist: error: {error}")


if __name__ == "__main__":
    main()
