"""Device-side batch augmentation and normalization: timm's recipe as batched tensor ops.

RandAugment ops are checked against PIL on small uint8 images with timm's level-to-argument
functions written out here (not read from the module's table); the draws, random erasing and
Mixup/CutMix against their distributions, with fixed seeds and bounds loose enough (p < 1e-6
under the recipe) that a right implementation does not flake and tight enough that a skewed
one fails (checked on skewed samples).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.profiler import ProfilerActivity, profile

from t2t_dist.config import DataConfig
from t2t_dist.data import BatchAugment, normalize
from t2t_dist.data.augment import (MAGNITUDE_MAX, RAND_AUGMENT_OPS, RAND_AUGMENT_PROB, RandAugment,
                                   RandAugmentDraw, draw_rand_augment, smooth_one_hot)

FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean
OFF = DataConfig(rand_augment_ops=0, random_erasing=0.0, mixup_alpha=0.0, cutmix_alpha=0.0)
CHI2_14_P1E6 = 54.6  # chi-square critical value, 14 degrees of freedom, p = 1e-6
Z_P1E6 = 4.9  # two-sided normal bound, p ~ 1e-6


def _batch(size=16, side=32):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, 3, side, side), dtype=torch.uint8, generator=generator)
    return images, torch.arange(size) % 10


def _binomial_ok(count: int, trials: int, p: float) -> bool:
    return abs(count - trials * p) <= Z_P1E6 * math.sqrt(trials * p * (1 - p))


# The draws


def _op_chi_square(ops: torch.Tensor) -> float:
    counts = torch.bincount(ops.flatten(), minlength=len(RAND_AUGMENT_OPS)).double()
    expected = ops.numel() / len(RAND_AUGMENT_OPS)
    return float(((counts - expected) ** 2 / expected).sum())


def test_draw_matches_the_recipe_distribution():
    torch.manual_seed(0)
    draw = draw_rand_augment(30_000, 2, magnitude=9.0, std=0.5)
    assert draw.op.shape == draw.applied.shape == draw.magnitude.shape == draw.sign.shape == (2, 30_000)
    trials = draw.op.numel()
    assert _op_chi_square(draw.op) < CHI2_14_P1E6  # uniform over the 15 ops
    for layer_ops in draw.op:  # and independently per layer
        assert _op_chi_square(layer_ops) < CHI2_14_P1E6
    assert _binomial_ok(int(draw.applied.sum()), trials, RAND_AUGMENT_PROB)
    assert _binomial_ok(int((draw.sign < 0).sum()), trials, 0.5)
    assert set(draw.sign.unique().tolist()) == {-1.0, 1.0}
    magnitudes = draw.magnitude.double()
    # N(9, 0.5) clipped to [0, 10]: clipping at 10 (z = 2) moves the mean and std slightly.
    assert abs(float(magnitudes.mean()) - 8.9958) < Z_P1E6 * 0.5 / math.sqrt(trials)
    assert abs(float(magnitudes.std()) - 0.4828) < 0.01
    assert _binomial_ok(int((draw.magnitude == MAGNITUDE_MAX).sum()), trials, 0.02275)


def test_draw_clips_the_magnitude_and_keeps_it_fixed_without_std():
    torch.manual_seed(1)
    draw = draw_rand_augment(20_000, 1, magnitude=9.8, std=0.5)
    assert float(draw.magnitude.max()) == MAGNITUDE_MAX
    assert _binomial_ok(int((draw.magnitude == MAGNITUDE_MAX).sum()), 20_000, 0.3446)  # P(z > 0.4)
    low = draw_rand_augment(20_000, 1, magnitude=0.2, std=0.5).magnitude
    assert float(low.min()) == 0.0 and _binomial_ok(int((low == 0).sum()), 20_000, 0.3446)
    assert (draw_rand_augment(100, 3, magnitude=7.0, std=0.0).magnitude == 7.0).all()
    uniform = draw_rand_augment(20_000, 1, magnitude=8.0, std=101.0).magnitude  # timm: U(0, m)
    assert 0 <= float(uniform.min()) and float(uniform.max()) <= 8.0
    assert abs(float(uniform.double().mean()) - 4.0) < Z_P1E6 * 8 / math.sqrt(12 * 20_000)


def test_the_statistical_bounds_catch_a_skewed_draw():
    torch.manual_seed(2)
    uniform = draw_rand_augment(30_000, 2, magnitude=9.0, std=0.5)
    weights = torch.ones(len(RAND_AUGMENT_OPS))
    weights[3] = 1.2  # one op 20% more likely than the others
    skewed = torch.multinomial(weights, uniform.op.numel(), replacement=True).view_as(uniform.op)
    assert _op_chi_square(uniform.op) < CHI2_14_P1E6 < _op_chi_square(skewed)
    trials = uniform.applied.numel()
    assert not _binomial_ok(int((torch.rand(trials) < 0.48).sum()), trials, RAND_AUGMENT_PROB)
    shifted = uniform.magnitude.double() + 0.02  # a magnitude 0.02 too high on average
    assert abs(float(shifted.mean()) - 8.9958) > Z_P1E6 * 0.5 / math.sqrt(trials)


# Each op against PIL, with timm's level-to-argument functions


def _timm_reference(image: Image.Image, name: str, magnitude: float, sign: float) -> Image.Image:
    """timm's AugmentOp(name) at ``magnitude`` (negated where ``sign`` < 0), bilinear, on PIL."""
    level = magnitude / 10
    negate = -1.0 if sign < 0 else 1.0
    affine = dict(resample=Image.BILINEAR, fillcolor=FILL)
    width, height = image.size
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Invert":
        return ImageOps.invert(image)
    if name == "Rotate":
        return image.rotate(negate * level * 30, **affine)
    if name == "Posterize":
        return ImageOps.posterize(image, int(level * 4))
    if name == "Solarize":
        return ImageOps.solarize(image, min(256, int(level * 256)))
    if name == "SolarizeAdd":
        add = min(128, int(level * 110))
        return image.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return getattr(ImageEnhance, name)(image).enhance(level * 1.8 + 0.1)
    matrix = {"ShearX": (1, negate * level * 0.3, 0, 0, 1, 0),
              "ShearY": (1, 0, 0, negate * level * 0.3, 1, 0),
              "TranslateXRel": (1, 0, negate * level * 0.45 * width, 0, 1, 0),
              "TranslateYRel": (1, 0, 0, 0, 1, negate * level * 0.45 * height)}[name]
    return image.transform(image.size, Image.AFFINE, matrix, **affine)


def _one_op(images: torch.Tensor, name: str, magnitude: float, sign: float) -> torch.Tensor:
    batch = len(images)
    draw = RandAugmentDraw(op=torch.full((1, batch), RAND_AUGMENT_OPS.index(name)),
                           applied=torch.ones(1, batch, dtype=torch.bool),
                           magnitude=torch.full((1, batch), magnitude), sign=torch.full((1, batch), sign))
    return RandAugment(1, 9.0, 0.5, FILL).transform(images.float(), draw)


def _test_images() -> torch.Tensor:
    """Random pixels, a low-contrast image, a two-level one and a constant one, 20 x 26."""
    generator = torch.Generator().manual_seed(3)
    noise = torch.randint(0, 256, (2, 3, 20, 26), generator=generator)
    smooth = torch.randint(90, 141, (1, 3, 20, 26), generator=generator)
    two_levels = torch.where(torch.rand(1, 1, 20, 26, generator=generator) < 0.3, 40, 200)
    two_levels = two_levels.expand(1, 3, 20, 26)
    constant = torch.full((1, 3, 20, 26), 77)
    return torch.cat([noise, smooth, two_levels, constant]).to(torch.uint8)


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@pytest.mark.parametrize("magnitude, sign", [(9.0, 1.0), (6.3, -1.0), (10.0, -1.0)])
@pytest.mark.parametrize("name", RAND_AUGMENT_OPS)
def test_op_matches_pil(name, magnitude, sign):
    images = _test_images()
    ours = _one_op(images, name, magnitude, sign)
    assert ((ours >= 0) & (ours <= 255) & (ours == ours.round())).all()
    for image, out in zip(images, ours):
        pil = _timm_reference(Image.fromarray(image.permute(1, 2, 0).numpy()), name, magnitude, sign)
        expected = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float()
        difference = (out - expected).abs()
        if name in GEOMETRIC or name == "AutoContrast":
            # PIL truncates float64 sums (bilinear weights, autocontrast's scale); ours are
            # float32: a level apart where the exact value is an integer. The fill matches.
            assert float(difference.max()) <= 1, f"{name}: {difference.max()}"
        else:
            assert torch.equal(out, expected), f"{name}: {int((difference > 0).sum())} pixels differ"


def test_geometric_ops_move_content_as_pil_does():
    """A smooth image (bilinear errors stay small): the bulk of pixels within one level."""
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(48.0), indexing="ij")
    image = torch.stack([xs * 5, ys * 6, (xs + ys) * 2.5]).clamp(0, 255).round().to(torch.uint8)[None]
    for name in GEOMETRIC:
        for sign in (1.0, -1.0):
            ours = _one_op(image, name, 7.0, sign)[0]
            pil = _timm_reference(Image.fromarray(image[0].permute(1, 2, 0).numpy()), name, 7.0, sign)
            expected = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float()
            assert (ours - expected).abs().le(1).float().mean() > 0.99, name
            assert (ours == torch.tensor(FILL).view(3, 1, 1)).all(0).any()  # fill came in


def test_unapplied_and_undrawn_ops_leave_images_alone():
    images, _ = _batch(8)
    batch = len(images)
    for name in RAND_AUGMENT_OPS:
        draw = RandAugmentDraw(op=torch.full((2, batch), RAND_AUGMENT_OPS.index(name)),
                               applied=torch.zeros(2, batch, dtype=torch.bool),
                               magnitude=torch.full((2, batch), 9.0), sign=torch.ones(2, batch))
        assert torch.equal(RandAugment(2, 9.0, 0.5, FILL).transform(images.float(), draw), images.float())


def test_mixed_ops_in_one_batch_match_each_op_alone():
    """Every image its own op: the same pixels as a batch of that op only."""
    torch.manual_seed(4)
    images = torch.randint(0, 256, (len(RAND_AUGMENT_OPS), 3, 16, 16), dtype=torch.uint8)
    ops = torch.arange(len(RAND_AUGMENT_OPS))
    draw = RandAugmentDraw(op=ops[None], applied=torch.ones(1, len(ops), dtype=torch.bool),
                           magnitude=torch.full((1, len(ops)), 8.0), sign=-torch.ones(1, len(ops)))
    mixed = RandAugment(1, 9.0, 0.5, FILL).transform(images.float(), draw)
    for index, name in enumerate(RAND_AUGMENT_OPS):
        assert torch.equal(mixed[index], _one_op(images[index:index + 1], name, 8.0, -1.0)[0]), name


def test_rand_augment_output_stays_integer_levels_in_uint8_range():
    torch.manual_seed(5)
    augment = RandAugment(3, 9.0, 0.5, FILL)
    images, _ = _batch(64)
    for _ in range(5):
        out = augment(images.float())
        assert out.shape == images.shape and out.dtype == torch.float32
        assert ((out >= 0) & (out <= 255) & (out == out.round())).all()
        assert not torch.equal(out, images.float())


# The whole batch augmentation


def test_batch_augment_shapes_dtypes_and_soft_targets():
    torch.manual_seed(0)
    augment = BatchAugment(DataConfig(), num_classes=10)
    images, labels = _batch()
    for _ in range(4):  # mixup, cutmix or neither: all paths give the same contract
        out, targets = augment(images, labels)
        assert out.shape == images.shape and out.dtype == torch.float32
        assert targets.shape == (16, 10) and targets.dtype == torch.float32
        assert torch.allclose(targets.sum(1), torch.ones(16), atol=1e-5)
        assert torch.isfinite(out).all() and (targets >= 0).all()


def test_batch_of_one():
    torch.manual_seed(0)
    images, labels = _batch(1)
    out, targets = BatchAugment(DataConfig(), num_classes=10)(images, labels)
    assert out.shape == images.shape and torch.isfinite(out).all()
    assert torch.allclose(targets, smooth_one_hot(labels, 10, 0.1))  # mixed with itself


def test_same_seed_same_batch():
    augment = BatchAugment(DataConfig(), num_classes=10)
    images, labels = _batch()
    torch.manual_seed(7)
    first = augment(images, labels)
    state = torch.get_rng_state()  # what checkpoint.rng_state saves
    second = augment(images, labels)
    torch.manual_seed(7)
    assert all(torch.equal(a, b) for a, b in zip(first, augment(images, labels)))
    torch.set_rng_state(state)
    assert all(torch.equal(a, b) for a, b in zip(second, augment(images, labels)))


def test_no_augmentation_gives_smoothed_one_hot_and_plain_normalization():
    """The demo recipe: the exact pixels and targets of plain normalization (golden losses)."""
    images, labels = _batch()
    out, targets = BatchAugment(OFF, num_classes=10)(images, labels)
    mean, std = torch.tensor(OFF.mean).view(1, 3, 1, 1), torch.tensor(OFF.std).view(1, 3, 1, 1)
    assert torch.equal(out, (images.float() / 255.0 - mean) / std)
    assert torch.equal(out, normalize(images, OFF))
    assert torch.equal(targets, smooth_one_hot(labels, 10, 0.1))
    assert torch.allclose(targets.max(1).values, torch.full((16,), 0.9 + 0.01))


def test_cutmix_targets_follow_the_pasted_area():
    torch.manual_seed(1)
    config = DataConfig(rand_augment_ops=0, random_erasing=0.0, mixup_alpha=0.0, label_smoothing=0.0)
    # Constant images, one value per sample: the pasted share is countable per pixel.
    labels = torch.arange(8)
    images = (labels * 30).to(torch.uint8).view(8, 1, 1, 1).expand(8, 3, 32, 32).contiguous()
    augment = BatchAugment(config, num_classes=8)
    for _ in range(5):
        out, targets = augment(images, labels)
        own = (out == normalize(images, config)).all(1).float().mean((1, 2))  # (B,) own pixels
        assert torch.allclose(targets[torch.arange(8), labels], own, atol=1e-5)
        assert torch.allclose(targets[torch.arange(8), labels.flip(0)], 1 - own, atol=1e-5)
        pasted = ~(out == normalize(images, config)).all(1)  # (B, H, W): the same box in every image
        assert (pasted == pasted[0]).all()


def test_mixup_targets_match_the_image_blend():
    torch.manual_seed(2)
    config = DataConfig(rand_augment_ops=0, random_erasing=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
    labels = torch.arange(8)
    images = (labels * 30).to(torch.uint8).view(8, 1, 1, 1).expand(8, 3, 4, 4).contiguous()
    out, targets = BatchAugment(config, num_classes=8)(images, labels)
    values = normalize(images, config)[:, 0, 0, 0]  # (B,) per-sample constant (channel 0)
    blended = targets @ values  # the target-weighted mix of sample values
    assert torch.allclose(out[:, 0, 0, 0], blended, atol=1e-4)


def _mix_kinds(config: DataConfig, batches: int) -> tuple[dict[str, int], list[float]]:
    """How often a batch was left alone, mixed up or cut and mixed; the lams of the mixups."""
    labels = torch.arange(4)
    images = torch.tensor([0, 60, 120, 240], dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 3, 16, 16)
    augment = BatchAugment(config, num_classes=4)
    plain = normalize(images, config)
    kinds, lams = {"none": 0, "mixup": 0, "cutmix": 0}, []
    for _ in range(batches):
        out, targets = augment(images, labels)
        if torch.equal(out, plain):
            kinds["none"] += 1
        elif ((out == plain) | (out == plain.flip(0))).all():
            kinds["cutmix"] += 1
        else:
            kinds["mixup"] += 1
            lams.append(float(targets[0, 0]))
    return kinds, lams


def test_mix_and_switch_probabilities_and_mixup_lam_distribution():
    torch.manual_seed(3)
    config = DataConfig(rand_augment_ops=0, random_erasing=0.0, mixup_prob=0.6, label_smoothing=0.0)
    kinds, lams = _mix_kinds(config, 1500)
    assert _binomial_ok(kinds["none"], 1500, 0.4)  # (a CutMix box of zero area counts as none)
    assert _binomial_ok(kinds["mixup"], 1500, 0.3)
    lams = torch.tensor(lams, dtype=torch.float64)  # Beta(0.8, 0.8): mean 1/2, variance 0.0962
    assert abs(float(lams.mean()) - 0.5) < Z_P1E6 * math.sqrt(0.0962 / len(lams))
    assert abs(float(lams.var()) - 0.0962) < 0.02


def test_random_erasing_boxes_follow_timm():
    torch.manual_seed(4)
    config = DataConfig(rand_augment_ops=0, random_erasing=1.0, mixup_alpha=0.0, cutmix_alpha=0.0)
    images = torch.full((400, 3, 40, 50), 128, dtype=torch.uint8)
    out, _ = BatchAugment(config, num_classes=10)(images, torch.zeros(400, dtype=torch.long))
    erased = (out != normalize(images, config)).all(1)  # (B, H, W); noise never hits the mean
    rows, cols = erased.any(2), erased.any(1)
    heights, widths = rows.sum(1).float(), cols.sum(1).float()
    assert torch.equal(erased.sum((1, 2)).float(), heights * widths)  # one rectangle each
    assert (heights * widths > 0).all()  # probability 1: every image erased
    area = heights * widths / (40 * 50)
    assert area.min() >= 0.018 and area.max() <= 0.34  # U(0.02, 1/3), rounded sides
    assert (widths < 50).all() and (heights < 40).all()
    values = out[erased.unsqueeze(1).expand_as(out)]
    assert abs(float(values.mean())) < 0.05 and abs(float(values.std()) - 1) < 0.05  # N(0, 1)
    top = rows.float().argmax(1)  # uniform over the positions that fit
    assert (top + heights <= 40).all() and top.min() == 0
    config = DataConfig(rand_augment_ops=0, random_erasing=0.25, mixup_alpha=0.0, cutmix_alpha=0.0)
    out, _ = BatchAugment(config, num_classes=10)(images, torch.zeros(400, dtype=torch.long))
    assert _binomial_ok(int((out != normalize(images, config)).any(1).flatten(1).any(1).sum()), 400, 0.25)


# Launch count and host syncs: every step a fixed sequence of whole-batch ops

# What a host-device sync or a host-to-device copy looks like on the CPU profile: a tensor read
# into Python (.item(), float(t), if t), a data-dependent shape, a tensor built from Python data.
SYNCS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero",
         "aten::lift_fresh")


def _profile(augment, batch: int, side: int) -> list:
    images, labels = _batch(batch, side)
    augment(images, labels)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        augment(images, labels)
    return [e for e in prof.events() if e.name.startswith("aten::")]


def _top_level(events: list) -> int:
    """aten ops called from Python (not those nested inside another aten op)."""
    nested = {id(child) for e in events for child in e.cpu_children if child.name.startswith("aten::")}
    return sum(id(e) not in nested for e in events)


def test_aten_calls_per_batch_are_few_flat_in_the_batch_size_and_never_sync():
    """Top-level aten calls, the bound; benchmarks/augment_calls.py also prints all of them
    (nested included: about 920 per batch here, 11,250 at batch 128 before)."""
    torch.manual_seed(0)
    augment = BatchAugment(DataConfig(), num_classes=1000)
    small, large, larger_images = _profile(augment, 16, 32), _profile(augment, 128, 32), _profile(augment, 16, 64)
    assert _top_level(large) <= 400
    assert abs(_top_level(large) - _top_level(small)) <= 3
    assert abs(_top_level(larger_images) - _top_level(small)) <= 3  # nor in the image size
    assert abs(len(large) - len(small)) <= 10
    assert not [e.name for e in large if e.name in SYNCS]
