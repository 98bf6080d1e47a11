"""The tune section and sweep checks: YAML round trip, one-line errors before Ray, presets,
model architecture overrides (no Ray started here)."""

import sys
from pathlib import Path

import pytest

from t2t_dist.config import Config, ConfigError, ModelConfig, load_config, save_config
from t2t_dist.launch.sweep import check_sweep, model_cost, trial_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "jobs" / "configs").glob("sweep_*.yaml"))
sys.path.insert(0, str(ROOT / "jobs"))
import sweep  # noqa: E402  (jobs/sweep.py)

DIGITS_SCALED = [  # the README's scaled-down overrides (data URLs left to each test)
    "model.img_size=32", "model.num_classes=10", "model.compile=false", "data.global_batch=64",
    "data.eval_batch=150", "data.loader_workers=0", "optim.epochs=3", "optim.warmup_epochs=0.5",
    "optim.cooldown_epochs=0", "optim.reference_batch=64", "optim.lr=4e-3", "optim.ema_decay=0",
    "run.storage_path=./runs", "run.log_model=false", "scaling.num_workers=1",
    "scaling.use_gpu=false", "scaling.cpus_per_worker=0.99"]


def test_tune_section_round_trips_and_nested_equals_dotted(tmp_path):
    nested = load_config(overrides=["tune.space.model.depth={grid: [2, 4]}",
                                    "tune.space.optim.lr={grid: [1.0e-3]}"])
    dotted = load_config(overrides=["tune.space={model.depth: {grid: [2, 4]}, "
                                    "optim.lr: {grid: [1.0e-3]}}"])
    assert nested == dotted and nested.tune.fields() == ["model.depth", "optim.lr"]
    save_config(nested, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == nested


@pytest.mark.parametrize("overrides, message", [
    (["tune.space.model.dept={grid: [2]}"], "tune.space key 'model.dept' is not a config field"),
    (["tune.space.optim.lr={loguniform: [1e-4, 1e-3]}"],
     "with tune.search='grid' (or tune.search=random / optuna"),
    (["tune.search=optuna", "tune.space.model.depth={grid: [2]}"], "(no grids)"),
    (["tune.search=random", "tune.space.optim.lr={loguniform: [0, 1e-3]}"], "with 0 < low"),
    (["tune.search=random", "tune.space.optim.lr={uniform: [1e-3, 1e-4]}"], "with low < high"),
    (["tune.space.model.depth={between: [2, 4]}"], "tune.space.model.depth.between=[2, 4] is invalid: expected one of {grid"),
    (["tune.space.model.depth={grid: []}"], "with at least one value"),
    (["tune.reduction_factor=1"], "tune.reduction_factor=1.0 is invalid"),
])
def test_bad_tune_sections_fail_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    ([], "tune.space is empty: expected at least one entry"),
    (["tune.space.model.depth={grid: [2]}", "tune.metric=val/accuracy"],
     "tune.metric='val/accuracy' is invalid: the job reports only val/top1"),
    (["tune.space.model.depth={grid: [2]}", "tune.metric=val_ema/top1", "optim.ema_decay=0"],
     "tune.metric='val_ema/top1' is invalid"),
    (["tune.space.model.depth={grid: [2]}", "run.checkpoint_every=10"],
     "run.checkpoint_every=10 is invalid in a sweep: expected 0"),
    (["model.name=t2t_vit_tiny", "tune.space.model.embed_dim={grid: [32, 33]}"],
     "sweep trial {model.embed_dim=33} is invalid: model.num_heads=2 is invalid: expected a "
     "divisor of every block width (33)"),
    (["tune.search=random", "tune.space.model.drop_path_rate={uniform: [0.0, 1.0]}"],
     "sweep trial {model.drop_path_rate=1.0} is invalid"),
    (["tune.space.model.depth={grid: [2]}", "optim.epochs=3", "optim.warmup_epochs=1",
      "optim.cooldown_epochs=0", "tune.grace_period=3"],
     "tune.grace_period=3 is invalid with optim.epochs=3: expected fewer epochs than a trial "
     "runs"),
])
def test_sweeps_that_cannot_run_fail_before_ray(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_sweep(load_config(overrides=overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("argv", [
    ["--set", "tune.space.model.dept={grid: [2]}"],
    ["--set", "tune.space={}"],
    ["--set", "tune.metric=val/accuracy"],
])
def test_job_rejects_bad_sweeps_in_one_line_without_ray(argv, digits_shards, capsys):
    import ray

    base = ["--config", str(ROOT / "jobs" / "configs" / "sweep_hparams.yaml"),
            "--set", f"data.train_urls={digits_shards['train']}",
            "--set", f"data.val_urls={digits_shards['val']}", *sum(
                (["--set", item] for item in DIGITS_SCALED), [])]
    assert sweep.main(base + argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("sweep: error: ") and "\n" not in error
    assert not ray.is_initialized()


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_presets_check_full_and_scaled_down(path):
    full = load_config(path)
    assert check_sweep(full) >= 3 and full.tune.name
    if path.stem.endswith("_digits"):  # the README's scaled-down sweeps: a CPU, digits
        assert full.data.train_urls == "digits://train" and not full.scaling.use_gpu
        assert full.tune.max_concurrent_trials == 2 and full.run.name == full.tune.name
        return
    scaled = DIGITS_SCALED + ["tune.grace_period=1", "tune.num_samples=4"]
    if path.stem == "sweep_depth_width":
        scaled += ["model.name=t2t_vit_tiny", "tune.space.model.depth={grid: [1, 2]}",
                   "tune.space.width={grid: [{model.embed_dim: 32, model.num_heads: 2}, "
                   "{model.embed_dim: 64, model.num_heads: 4}]}"]
    assert check_sweep(load_config(path, overrides=scaled)) >= 2


def test_arch_transfer_covers_the_papers_variants():
    config = load_config(ROOT / "jobs" / "configs" / "sweep_arch_transfer.yaml")
    names = config.tune.space["model.name"]["grid"]
    assert {"vit_s_16", "vit_dn", "vit_sw", "vit_se", "vit_resnext", "vit_ghost", "vit_dense",
            "t2t_vit_14", "t2t_vit_14_wide", "t2t_vit_dense", "t2t_vit_14_se",
            "t2t_vit_14_resnext", "t2t_vit_16_ghost", "t2t_vit_14_wo_t2t"} == set(names)


def test_architecture_overrides_reach_the_model():
    assert ModelConfig().architecture() == {}
    with pytest.raises(ConfigError, match="model.block='bottleneck' is invalid"):
        ModelConfig(block="bottleneck")
    base = load_config(overrides=["model.name=t2t_vit_tiny", "model.img_size=32",
                                  "model.num_classes=10"])
    params, gmacs = model_cost(base)
    deeper = trial_config(base, {"model.depth": 4})
    assert deeper.model.depth == 4 and deeper.tune == Config().tune
    deeper_params, deeper_gmacs = model_cost(deeper)
    assert deeper_params > params and deeper_gmacs > gmacs
    wide = trial_config(base, {"width": {"model.embed_dim": 64, "model.num_heads": 4}})
    assert model_cost(wide)[0] > 2 * params
