"""load_pretrained: released file layouts, image-size and class-count changes, and a clear report."""

import argparse

import pytest
import torch

from t2t_dist.models import create_model, load_pretrained, resize_pos_embed


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return create_model("t2t_vit_7", img_size=64)


def same_weights(model, state, skip=()):
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in state.items() if k not in skip)


@pytest.mark.parametrize("layout", ["ema", "state_dict", "module", "net", "raw"])
def test_released_layouts_load_strictly(tmp_path, source, layout):
    weights = source.state_dict()
    noise = {k: torch.randn_like(v) for k, v in weights.items()}
    checkpoint = {
        "ema": {"state_dict": noise, "state_dict_ema": weights, "epoch": 309,
                "args": argparse.Namespace(model="t2t_vit_7", lr=5e-4)},
        "state_dict": {"state_dict": weights, "epoch": 3},
        "module": {"state_dict": {"module." + k: v for k, v in weights.items()}},
        "net": {"net": {"module." + k: v for k, v in weights.items()}, "acc": 97.1},
        "raw": weights,
    }[layout]
    torch.save(checkpoint, tmp_path / "released.pth.tar")
    torch.manual_seed(1)
    model = create_model("t2t_vit_7", img_size=64)
    report = load_pretrained(model, tmp_path / "released.pth.tar", strict=True)
    assert same_weights(model, weights)
    assert report.source == {"ema": "state_dict_ema", "module": "state_dict", "net": "net",
                             "raw": "raw"}.get(layout, layout)
    assert report.loaded == len(weights) and not (report.missing or report.unexpected)
    assert ("module." in report.prefixes_stripped) == (layout in ("module", "net"))
    assert "\n" not in str(report)


def test_224_weights_into_384_model_resize_pos_embed():
    torch.manual_seed(0)
    weights = create_model("t2t_vit_7").state_dict()
    model = create_model("t2t_vit_7", img_size=384)
    report = load_pretrained(model, weights)
    assert report.resized == {"pos_embed": ((1, 197, 256), (1, 577, 256))}
    assert "resized pos_embed [1, 197, 256] -> [1, 577, 256]" in str(report)
    assert same_weights(model, weights, skip={"pos_embed"})
    torch.testing.assert_close(model.pos_embed[:, :1], weights["pos_embed"][:, :1])  # class row kept
    # Bicubic on the grid: a grid of the same size comes back unchanged, corners stay near corners.
    torch.testing.assert_close(resize_pos_embed(weights["pos_embed"], 197), weights["pos_embed"])
    old = weights["pos_embed"][0, 1:].reshape(14, 14, -1)
    new = model.pos_embed[0, 1:].reshape(24, 24, -1)
    assert (new[0, 0] - old[0, 0]).abs().mean() < (new[0, 0] - old[13, 13]).abs().mean()


def test_other_class_count_drops_the_head(tmp_path):
    torch.manual_seed(0)
    weights = create_model("t2t_vit_7", img_size=64).state_dict()
    model = create_model("t2t_vit_7", img_size=64, num_classes=10)
    report = load_pretrained(model, {"state_dict_ema": weights}, strict=True)
    assert report.head_dropped and "head dropped" in str(report)
    assert not report.missing and same_weights(model, weights, skip={"head.weight", "head.bias"})
    assert model.head.weight.shape == (10, 256)


def test_strict_refuses_a_mismatch_and_leaves_the_model_alone(source):
    weights = dict(source.state_dict())
    del weights["blocks.0.attn.qkv.weight"]
    weights["extra.bias"] = torch.zeros(3)
    model = create_model("t2t_vit_7", img_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing 1: blocks.0.attn.qkv.weight.*unexpected 1: extra.bias"):
        load_pretrained(model, weights)
    assert same_weights(model, before)
    report = load_pretrained(model, weights, strict=False)
    assert report.missing == ["blocks.0.attn.qkv.weight"] and report.unexpected == ["extra.bias"]
    assert same_weights(model, {k: v for k, v in weights.items() if k != "extra.bias"})


def test_wrong_variant_is_refused_naming_the_shapes(source):
    model = create_model("t2t_vit_14", img_size=64)
    with pytest.raises(ValueError, match=r"t2t_vit_14.*skipped .*cls_token \[1, 1, 256\] vs \[1, 1, 384\]"):
        load_pretrained(model, source.state_dict())


def test_missing_file_and_bad_layout_are_clear(tmp_path):
    model = create_model("t2t_vit_tiny", img_size=32)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(model, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="holds no state dict"):
        load_pretrained(model, {"epoch": 3})
