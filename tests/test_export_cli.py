"""`t2t-dist export` on weights files (no Ray): layouts in, one released-layout fp32 state dict
out, pt or safetensors; bad input in one line. ZeRO checkpoints of a real 2-worker run and the
MLflow registry: test_evaluate_finetune_export.py."""

import os

import pytest
import torch
from safetensors.torch import load_file

from t2t_dist import cli
from t2t_dist.export import Weights, released_state_dict, resolve_weights
from t2t_dist.models import create_model, load_pretrained


@pytest.fixture
def released(tmp_path):
    """An authors'-style file: ``module.`` prefixes, bf16 EMA beside fp32 raw weights."""
    torch.manual_seed(0)
    raw = create_model("t2t_vit_tiny", img_size=32, num_classes=10).state_dict()
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in raw.items()}
    path = tmp_path / "released.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in raw.items()},
                "state_dict_ema": {f"module.{k}": v.to(torch.bfloat16) if v.is_floating_point() else v
                                   for k, v in ema.items()}, "epoch": 3}, path)
    return path, raw, ema


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_export_a_released_file_to_the_released_layout(released, tmp_path, fmt, capsys):
    path, raw, ema = released
    out = tmp_path / f"out.{fmt}"
    cli.main(["export", str(path), str(out), "--model", "t2t_vit_tiny", "--img-size", "32",
              "--num-classes", "10", "--ema"])
    assert f"to {out}" in capsys.readouterr().out
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file (safetensors: 0600)
    state = load_file(str(out)) if fmt == "safetensors" else torch.load(out, weights_only=True)
    model = create_model("t2t_vit_tiny", img_size=32, num_classes=10)
    if fmt == "pt":  # released key order, no prefixes (safetensors stores keys sorted)
        assert list(state) == list(model.state_dict())
    model.load_state_dict(state, strict=True)
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    for name, tensor in ema.items():  # the EMA sub-dict, bf16 -> fp32
        torch.testing.assert_close(state[name], tensor.to(torch.bfloat16).float(), rtol=0, atol=0)
    report = load_pretrained(create_model("t2t_vit_tiny", img_size=32, num_classes=10), str(out)) \
        if fmt == "pt" else None
    assert report is None or (report.source == "raw" and not report.missing)


def test_without_a_variant_the_prefixes_are_stripped(released):
    path, raw, _ = released
    state = released_state_dict(Weights(resolve_weights(str(path)).checkpoint, source=str(path),
                                        kind="file"))
    assert set(state) == set(raw)  # without --ema the file's preference (EMA) as load_pretrained


@pytest.mark.parametrize("argv, message", [
    (["export", "no-such-run", "out.pt"], "checkpoint 'no-such-run' does not exist"),
    (["export", "RELEASED", "out.pt", "--register", "x"], "--register needs the variant of"),
    (["export", "RELEASED", "out.pt", "--model", "t2t_vit_mini", "--img-size", "32",
      "--num-classes", "10"], "does not fit model.name='t2t_vit_mini'"),
    (["export", "RELEASED", "out.bin", "--model", "t2t_vit_tiny", "--img-size", "32",
      "--num-classes", "7"], "has a head of another class count than model.num_classes=7"),
])
def test_bad_export_input_is_one_line(argv, message, released, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(released[0]) if item == "RELEASED" else item for item in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    error = str(exit_info.value.code)
    assert error.startswith("t2t-dist: error: ") and message in error and "\n" not in error, error
    assert not (tmp_path / "out.pt").exists()
