"""The configuration layer: YAML + overrides round trip, one-line errors naming field and value."""

from pathlib import Path

import pytest
import yaml

from t2t_dist.config import (Config, ConfigError, apply_overrides, flatten, load_config,
                             save_config, to_dict, worker_batch_split)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml"))


def test_defaults_validate_and_round_trip(tmp_path):
    config = Config()
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config


def test_precedence_file_then_model_then_set(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {name: t2t_vit_14, img_size: 384}\noptim: {lr: 0.001}\n")
    config = load_config(tmp_path / "c.yaml", model="t2t_vit_7",
                         overrides=["optim.lr=2e-3", "optim.betas=[0.8, 0.9]"])
    assert config.model.name == "t2t_vit_7" and config.model.img_size == 384
    assert config.optim.lr == 2e-3 and config.optim.betas == (0.8, 0.9)


@pytest.mark.parametrize("overrides, message", [
    (["engine.precision=fp8"], "engine.precision='fp8' is invalid: expected one of 'fp32', 'bf16', 'fp16'"),
    (["engine.presicion=bf16"], "unknown config key 'engine.presicion'"),
    (["data.global_batch=1000", "scaling.num_workers=8", "engine.micro_batch=64"],
     "data.global_batch=1000 is invalid: expected a multiple of engine.micro_batch(64) x "
     "workers(8) = 512: 512 or 1024"),
    (["data.global_batch=63", "scaling.num_workers=2"],
     "data.global_batch=63 is invalid: expected a multiple of the workers (2): 62 or 64"),
    (["data.global_batch=1", "scaling.num_workers=2"],
     "data.global_batch=1 is invalid: expected a multiple of the workers (2): 2"),
    (["model.drop_path_rate=1.5"], "model.drop_path_rate=1.5 is invalid"),
    (["optim.lr=fast"], "optim.lr='fast' is invalid: expected a number"),
    (["scaling.num_workers=two"], "scaling.num_workers='two' is invalid: expected an integer"),
    (["optim"], "override 'optim' is invalid: expected section.field=value"),
    (["engine.offload_params=cpu", "engine.zero_stage=2"], "engine.zero_stage (with offload_params)=2"),
    (["scaling.num_workers=2", "scaling.min_workers=3"],
     "scaling.min_workers=3 is invalid: expected 0 (a fixed group) or 1 to scaling.num_workers(2)"),
    (["scaling.num_workers=4", "scaling.min_workers=1", "data.global_batch=64"],
     "scaling.min_workers=1 is invalid: data.global_batch=64 does not split evenly over 3 workers, "
     "and Ray Train may run the group at any size from min_workers to num_workers(4); expected "
     "min_workers >= 4 or a global batch every size divides"),
    (["scaling.resize_check_s=0"], "scaling.resize_check_s=0.0 is invalid: expected 0 < resize_check_s"),
])
def test_bad_values_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_file_is_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_configs_are_frozen():
    config = Config()
    with pytest.raises(AttributeError):
        config.optim.lr = 1.0  # type: ignore[misc]


def test_flat_params_hold_only_plain_values():
    flat = flatten(to_dict(Config()))
    assert flat["optim.lr"] == 5e-4 and flat["data.mean"] == [0.485, 0.456, 0.406]
    assert all(isinstance(v, (str, int, float, bool, list, dict, type(None))) for v in flat.values())


def test_apply_overrides_does_not_mutate_input():
    data = {"optim": {"lr": 1.0}}
    assert apply_overrides(data, ["optim.lr=2"])["optim"]["lr"] == 2
    assert data["optim"]["lr"] == 1.0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_job_configs_load_as_written(path, tmp_path):
    """Every value a shipped file sets arrives in the config (none dropped, renamed or
    coerced into something else), and the loaded config round-trips through YAML."""
    config = load_config(path)
    written = flatten(yaml.safe_load(path.read_text()))
    loaded = flatten(to_dict(config))
    assert written and {key: loaded.get(key, "<missing>") for key in written} == written
    save_config(config, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == config


@pytest.mark.parametrize("settings, splits", [
    # An elastic group keeps micro batches at most the full group's; accumulation makes up the rest.
    (["scaling.num_workers=2", "scaling.min_workers=1", "data.global_batch=64"],
     {1: (32, 2), 2: (32, 1)}),
    (["scaling.num_workers=4", "scaling.min_workers=2", "data.global_batch=48"],
     {2: (12, 2), 3: (8, 2), 4: (12, 1)}),
    (["scaling.num_workers=2", "scaling.min_workers=1", "data.global_batch=64",
      "engine.micro_batch=16"], {1: (16, 4), 2: (16, 2)}),
    (["scaling.num_workers=2", "data.global_batch=64"], {2: (32, 1)}),  # fixed: batch_split
])
def test_worker_batch_split_keeps_the_global_batch_at_every_group_size(settings, splits):
    config = load_config(overrides=settings)
    sizes = range(config.scaling.min_workers or config.scaling.num_workers,
                   config.scaling.num_workers + 1)
    assert {workers: worker_batch_split(config, workers) for workers in sizes} == splits
    for workers, (micro, accum) in splits.items():
        assert micro * accum * workers == config.data.global_batch
