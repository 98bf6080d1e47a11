"""Device side of the input pipeline: batch augmentation and normalization, as batched tensor ops.

    augment = BatchAugment(data_cfg, num_classes).to(device)
    images_f, targets = augment(images_uint8, labels)  # (B, 3, H, W) float, (B, C) soft targets
    images_f = normalize(images_uint8, data_cfg)       # eval

Training order (timm's recipe): RandAugment on [0, 255] pixels, normalize with the dataset
mean/std, random erasing, then Mixup or CutMix with label-smoothed soft targets. Every step
is a fixed sequence of whole-batch ops: no host-device sync, no loop over samples, no shape
that depends on the draws; randomness comes from the default generator of the batch's device
(the RNG states ``checkpoint.rng_state`` saves), so the same seed gives the same batch.

RandAugment is timm's ``rand-m9-mstd0.5`` (``timm/data/auto_augment.py``, 1.0.x): no ``inc1``,
so ``_RAND_TRANSFORMS`` (``RAND_AUGMENT_OPS`` here, 15 ops) with the non-increasing level
functions. ``rand_augment_ops`` layers; in each, every image draws one op uniformly (with
replacement across layers), applies it with probability 0.5 at a magnitude ``N(m, mstd)``
clipped to [0, 10], level ``= magnitude / 10``:

    Rotate               +-30 * level degrees about the centre (random sign)
    ShearX, ShearY       +-0.3 * level (random sign), about the top-left corner as PIL's affine
    TranslateX/YRel      +-0.45 * level of the width/height (random sign)
    Posterize            keep int(4 * level) bits (3 at m=9)
    Solarize             invert levels >= min(256, int(256 * level)) (230 at m=9)
    SolarizeAdd          add min(128, int(110 * level)) to levels < 128, clip at 255 (99 at m=9)
    Color, Contrast,     PIL ImageEnhance with factor 0.1 + 1.8 * level (1.72 at m=9, no sign):
    Brightness,            blend of the image with grey (L), its mean grey, black, or the
    Sharpness              SMOOTH-filtered image (border pixels kept), truncated as PIL's blend
    AutoContrast         per channel, stretch [min, max] to [0, 255]
    Equalize             per channel, PIL's histogram equalisation LUT
    Invert               255 - x

Pixels stay integers in [0, 255] after every op, as PIL's uint8 images do. Per layer, every
image goes through three stages, each the identity for the images whose op is not in it: the
four enhance ops as one blend, the point ops (AutoContrast .. SolarizeAdd) as one 256-level
LUT per image and channel, and the geometric ops as one ``grid_sample``, sampled PIL's way
(pixel centres, bilinear with edge clamping inside the image, timm's ``img_mean`` fill
outside: (124, 116, 104) for the ImageNet mean). Against PIL: the same pixels, but for
bilinear sampling and AutoContrast, within one level (PIL truncates float64 sums, these are
float32). Deliberate deviations: bilinear only (timm picks bilinear or bicubic at random per
application); Posterize at 0 bits gives black as older Pillow did (current Pillow rejects 0
bits; it needs a magnitude below 2.5, 13 mstd under m at the recipe).

Random erasing is timm's ``RandomErasing(probability, mode='pixel', max_count=1)`` on the
normalized batch: per image, up to 10 attempts of area U(0.02, 1/3) of the image and
log-aspect U(log 0.3, log 1/0.3); the first attempt that fits is filled with N(0, 1) noise.

Mixup/CutMix are timm's ``Mixup`` in 'batch' mode: with probability ``mixup_prob`` the batch is
mixed with its flip, by CutMix with probability ``mixup_switch_prob`` when both are enabled;
one ``lam ~ Beta(alpha, alpha)`` per batch; CutMix pastes one box per batch (timm's
``rand_bbox``) and corrects ``lam`` to the clipped box (``correct_lam``). Targets are timm's
``mixup_target``: ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from t2t_dist.config.data import DataConfig

RAND_AUGMENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                    "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                    "ShearY", "TranslateXRel", "TranslateYRel")  # timm's _RAND_TRANSFORMS
RAND_AUGMENT_PROB = 0.5  # timm's per-op probability ('p' of the config string)
MAGNITUDE_MAX = 10.0  # timm's _LEVEL_DENOM: level = magnitude / 10

# What each op sets, as value = base + slope * level (the level signed at random for the ops
# timm negates); an argument an op does not set keeps its neutral value, which leaves the
# image alone. grey/mean_grey/smoothed pick the enhance blend's degenerate image (none: black),
# autocontrast/equalize/geometric pick that stage's result; shift is in grid units (2 = the
# width or height), angle in radians as PIL's rotate uses it (-radians(degrees)).
_NEUTRAL = {"factor": 1.0, "grey": 0.0, "mean_grey": 0.0, "smoothed": 0.0, "autocontrast": 0.0,
            "equalize": 0.0, "bits": 8.0, "threshold": 256.0, "add": 0.0, "geometric": 0.0,
            "angle": 0.0, "shear_x": 0.0, "shear_y": 0.0, "shift_x": 0.0, "shift_y": 0.0}
_ENHANCE = (0.1, 1.8)  # timm's _enhance_level_to_arg: factor 0.1 + 1.8 level
_OP_ARGUMENTS = {  # name: ({argument: (base, slope)}, negated at random)
    "AutoContrast": ({"autocontrast": (1, 0)}, False),
    "Equalize": ({"equalize": (1, 0)}, False),
    "Invert": ({"threshold": (0, 0)}, False),  # solarize everything
    "Rotate": ({"geometric": (1, 0), "angle": (0, -math.pi / 6)}, True),  # +-30 level degrees
    "Posterize": ({"bits": (0, 4)}, False),  # int(4 level) bits kept
    "Solarize": ({"threshold": (0, 256)}, False),  # levels >= int(256 level) inverted
    "SolarizeAdd": ({"add": (0, 110)}, False),  # int(110 level) added below 128
    "Color": ({"factor": _ENHANCE, "grey": (1, 0)}, False),
    "Contrast": ({"factor": _ENHANCE, "mean_grey": (1, 0)}, False),
    "Brightness": ({"factor": _ENHANCE}, False),
    "Sharpness": ({"factor": _ENHANCE, "smoothed": (1, 0)}, False),
    "ShearX": ({"geometric": (1, 0), "shear_x": (0, 0.3)}, True),
    "ShearY": ({"geometric": (1, 0), "shear_y": (0, 0.3)}, True),
    "TranslateXRel": ({"geometric": (1, 0), "shift_x": (0, 2 * 0.45)}, True),
    "TranslateYRel": ({"geometric": (1, 0), "shift_y": (0, 2 * 0.45)}, True),
}
_INTEGER_ARGUMENTS = ("bits", "threshold", "add")  # timm's int(): floored (adjacent in _NEUTRAL)
# Per layer, what the image stages read, each (B, 1, 1, 1).
_PLAN = ("factor", "grey", "mean_grey", "smoothed", "autocontrast", "equalize", "quantum",
         "threshold", "add", "geometric")
_ERASE_AREA = (0.02, 1 / 3)  # of the image
_ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
_ERASE_ATTEMPTS = 10
_BILINEAR_SLACK = 1e-3  # levels added before truncating a bilinear sample (see _geometric)
_PIL_LUMA = (19595 / 65536, 38470 / 65536, 7471 / 65536)  # PIL's RGB -> L, fixed point


def normalize(images: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32, scaled to [0, 1] and normalized by ``config.mean/std``."""
    mean = torch.tensor(config.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) -> (B, C): ``1 - smoothing + smoothing / C`` on the label, ``smoothing / C`` elsewhere."""
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


class RandAugmentDraw(NamedTuple):
    """One RandAugment draw for a batch; every field is (layers, B)."""

    op: torch.Tensor  # int64 index into RAND_AUGMENT_OPS
    applied: torch.Tensor  # bool
    magnitude: torch.Tensor  # float in [0, MAGNITUDE_MAX]
    sign: torch.Tensor  # float +-1, used by the ops timm negates at random


def draw_rand_augment(batch_size: int, layers: int, magnitude: float, std: float,
                      device: torch.device | str | None = None) -> RandAugmentDraw:
    """timm's draws for ``layers`` layers: op uniform, applied w.p. 0.5, magnitude N(m, std)
    clipped to [0, 10] (uniform on [0, m] for std > 100, as timm's ``mstd``), sign +-1."""
    shape = (layers, batch_size)
    op = torch.randint(len(RAND_AUGMENT_OPS), shape, device=device)
    uniform = torch.rand((3, *shape), device=device)
    if std > 100:
        magnitudes = magnitude * uniform[2]
    else:
        magnitudes = torch.randn(shape, device=device).mul_(std).add_(magnitude)
    return RandAugmentDraw(op, uniform[0] < RAND_AUGMENT_PROB, magnitudes.clamp_(0.0, MAGNITUDE_MAX),
                           torch.where(uniform[1] < 0.5, -1.0, 1.0))


class RandAugment(nn.Module):
    """timm's RandAugment on float (B, 3, H, W) images holding integer levels in [0, 255]."""

    def __init__(self, layers: int, magnitude: float, std: float, fill: tuple[float, float, float]):
        super().__init__()
        self.layers, self.magnitude, self.std = layers, magnitude, std
        base = [[_NEUTRAL[name] for name in _NEUTRAL] for _ in range(len(RAND_AUGMENT_OPS) + 1)]
        slope = [[0.0] * len(_NEUTRAL) for _ in range(len(RAND_AUGMENT_OPS) + 1)]
        for row, name in enumerate(RAND_AUGMENT_OPS):  # the last row: no op (index -1)
            for argument, (value, per_level) in _OP_ARGUMENTS[name][0].items():
                column = list(_NEUTRAL).index(argument)
                base[row][column], slope[row][column] = value, per_level
        negated = [_OP_ARGUMENTS[name][1] for name in RAND_AUGMENT_OPS] + [False]
        self.register_buffer("base", torch.tensor(base, dtype=torch.float64), persistent=False)
        self.register_buffer("slope", torch.tensor(slope, dtype=torch.float64), persistent=False)
        self.register_buffer("negated", torch.tensor(negated), persistent=False)
        fill = torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("fill", fill, persistent=False)
        self.register_buffer("luma", torch.tensor(_PIL_LUMA).view(1, 3, 1, 1), persistent=False)
        levels = torch.arange(256.0)
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("inverted", 255 - levels, persistent=False)
        self.register_buffer("below_128", levels < 128, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        draw = draw_rand_augment(len(images), self.layers, self.magnitude, self.std, images.device)
        return self.transform(images, draw)

    def transform(self, images: torch.Tensor, draw: RandAugmentDraw) -> torch.Tensor:
        """``images`` after the layers of ``draw``. A layer gives each image one op (or none),
        so its enhance, point and geometric stages commute: each leaves the other images alone."""
        height, width = images.shape[-2:]
        plan, theta = self._plan(draw, height, width)
        # grid_sample's coordinates of the pixel centres: 2 (i + 0.5) / size - 1
        xs = torch.linspace(1 / width - 1, 1 - 1 / width, width, device=images.device)
        ys = torch.linspace(1 / height - 1, 1 - 1 / height, height, device=images.device)
        xs, ys = xs.view(1, 1, width, 1), ys.view(1, height, 1, 1)
        x = images
        for layer in range(self.layers):
            arg = dict(zip(_PLAN, plan[layer].unbind(0)))
            x = self._enhance(x, arg)
            x = self._point_ops(x, arg)
            along_x, along_y, offset = theta[layer].unbind(0)  # (B, 1, 1, 2) each
            grid = torch.addcmul(torch.addcmul(offset, along_x, xs), along_y, ys)  # (B, H, W, 2)
            x = self._geometric(x, grid, arg["geometric"])
        return x

    def _plan(self, draw: RandAugmentDraw, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """The draw as per-image arguments: (layers, len(_PLAN), B, 1, 1, 1), and the geometric
        ops' sampling matrix (layers, 3, B, 1, 1, 2) in grid_sample's coordinates (x = 2 u / W - 1,
        y = 2 v / H - 1): the columns along x, along y and the offset; identity for other ops."""
        rows = torch.where(draw.applied, draw.op, -1)  # -1: the neutral row
        # In float64 as timm's Python floats: PIL then gets the same factors and thresholds.
        level = draw.magnitude.double() / MAGNITUDE_MAX
        level = torch.where(self.negated[rows], level * draw.sign, level)
        arguments = torch.addcmul(self.base[rows], self.slope[rows], level.unsqueeze(-1))
        first = list(_NEUTRAL).index(_INTEGER_ARGUMENTS[0])
        arguments[..., first:first + len(_INTEGER_ARGUMENTS)].floor_()
        arg = dict(zip(_NEUTRAL, arguments.float().unbind(-1)))  # each (layers, B)
        arg["quantum"] = torch.exp2(8 - arg["bits"])  # Posterize: levels kept are multiples of it
        layers, batch = draw.op.shape
        plan = torch.stack([arg[name] for name in _PLAN], 1).view(layers, len(_PLAN), batch, 1, 1, 1)
        # PIL samples the input at (a u + b v + c, d u + e v + f) for the output pixel centre
        # (u, v): Rotate a = e = cos, b = -d = sin, (c, f) keeping the centre; ShearX b = s_x;
        # ShearY d = s_y; translations c = p_x W, f = p_y H. In grid coordinates, with r = H / W:
        #   x_in = cos x + (sin + s_x) r y + s_x r + 2 p_x
        #   y_in = (s_y - sin) / r x + cos y + s_y / r + 2 p_y      (shift_* holds 2 p_*)
        cos, sin = arg["angle"].cos(), arg["angle"].sin()
        aspect = height / width
        theta = [cos, (arg["shear_y"] - sin) / aspect, (sin + arg["shear_x"]) * aspect, cos,
                 arg["shear_x"] * aspect + arg["shift_x"], arg["shear_y"] / aspect + arg["shift_y"]]
        return plan, torch.stack(theta, 1).view(layers, 3, 2, batch, 1, 1).permute(0, 1, 3, 4, 5, 2)

    def _enhance(self, x: torch.Tensor, arg: dict) -> torch.Tensor:
        """PIL's ImageEnhance: ``degenerate + factor * (x - degenerate)``, truncated, clipped;
        factor 1 and an integer degenerate leave an image exactly as it was."""
        grey = (x * self.luma).sum(1, keepdim=True).add_(0.5).floor_()  # (B, 1, H, W) PIL's L
        mean_grey = grey.mean((1, 2, 3), keepdim=True).add_(0.5).floor_()  # Contrast's degenerate
        # ImageFilter.SMOOTH: (3x3 sum + 4 centre) / 13, rounded; PIL keeps the border pixels.
        smoothed = x.clone()
        inner = smoothed[:, :, 1:-1, 1:-1]
        rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]  # separable 3x3 sum: (B, 3, H - 2, W)
        box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
        inner.copy_(box.add_(inner, alpha=4).div_(13).round_())
        degenerate = torch.addcmul(mean_grey * arg["mean_grey"], grey, arg["grey"])  # black if neither
        degenerate = torch.addcmul(degenerate, smoothed, arg["smoothed"])
        return (x - degenerate).mul_(arg["factor"]).add_(degenerate).floor_().clamp_(0, 255)

    def _point_ops(self, x: torch.Tensor, arg: dict) -> torch.Tensor:
        """AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd as one 256-level LUT
        per image and channel, (B, 3, 1, 256), gathered at the pixel levels."""
        batch, channels, height, width = x.shape
        pixels = x.view(batch, channels, 1, height * width)
        index = pixels.long()
        histogram = torch.zeros(batch, channels, 1, 256, device=x.device)
        histogram.scatter_add_(3, index, torch.ones((), device=x.device).expand(index.shape))
        low, high = torch.aminmax(pixels, dim=3, keepdim=True)  # (B, 3, 1, 1)
        # PIL's autocontrast: int((level - low) * 255 / (high - low)), clipped; identity if one level.
        span = high - low
        autocontrast = ((self.levels - low) * 255 / span.clamp(min=1)).floor_().clamp_(0, 255)
        # PIL's equalize: step = (pixels below the top level) // 255; LUT (step // 2 + pixels below
        # the level) // step, clipped; identity where step is 0 (one level, or too few pixels).
        below = histogram.cumsum(3) - histogram
        step = below.gather(3, high.long()).div_(255, rounding_mode="floor")
        equalize = below.add_(step.div(2, rounding_mode="floor"))
        equalize.div_(step.clamp(min=1), rounding_mode="floor").clamp_(max=255)
        # Posterize, Solarize (Invert: threshold 0), SolarizeAdd; identity at neutral arguments.
        lut = (self.levels / arg["quantum"]).floor_().mul_(arg["quantum"])
        lut = torch.where(self.levels < arg["threshold"], lut, self.inverted)
        lut = torch.where(self.below_128, (lut + arg["add"]).clamp_(max=255), lut)
        lut = torch.lerp(lut, equalize, arg["equalize"] * step.sign())  # weights 0 or 1: exact
        lut = torch.lerp(lut, autocontrast, arg["autocontrast"] * span.sign())
        return lut.gather(3, index).view_as(x)

    def _geometric(self, x: torch.Tensor, grid: torch.Tensor, geometric: torch.Tensor) -> torch.Tensor:
        """Rotate, ShearX/Y, TranslateX/YRel as one bilinear grid_sample, truncated as PIL's;
        points outside the image take ``fill`` (PIL's rule); other images come back untouched."""
        sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        outside = (grid.abs() > 1).any(3).unsqueeze(1)  # (B, 1, H, W)
        # PIL truncates; float32 weights can sum to 1 - 1e-7 where PIL's float64 gives a level exactly.
        sampled = torch.where(outside, self.fill, sampled.add_(_BILINEAR_SLACK).floor_())
        return torch.lerp(x, sampled, geometric)


def _random_erasing(x: torch.Tensor, probability: float) -> torch.Tensor:
    """timm's RandomErasing(probability, mode='pixel', max_count=1) on a normalized batch: per
    image, the first of 10 boxes (area, log-aspect uniform) that fits is filled with N(0, 1)."""
    batch, _, height, width = x.shape
    area_u, aspect_u = torch.rand(2, batch, _ERASE_ATTEMPTS, device=x.device)
    area = (area_u * (_ERASE_AREA[1] - _ERASE_AREA[0]) + _ERASE_AREA[0]) * (height * width)
    aspect = (aspect_u * (_ERASE_LOG_ASPECT[1] - _ERASE_LOG_ASPECT[0]) + _ERASE_LOG_ASPECT[0]).exp()
    box_h, box_w = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()  # (B, attempts)
    fits = (box_h < height) & (box_w < width)
    first = fits.byte().argmax(1, keepdim=True)  # the first attempt that fits (0 if none does)
    box_h, box_w = box_h.gather(1, first).view(batch, 1, 1), box_w.gather(1, first).view(batch, 1, 1)
    erase_u, top_u, left_u = torch.rand(3, batch, 1, 1, device=x.device)
    erase = (erase_u <= probability) & fits.any(1).view(batch, 1, 1)
    top, left = (top_u * (height - box_h + 1)).floor(), (left_u * (width - box_w + 1)).floor()
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    inside = (rows >= top) & (rows < top + box_h) & (cols >= left) & (cols < left + box_w) & erase
    return torch.where(inside.unsqueeze(1), torch.randn_like(x), x)  # inside: (B, H, W)


class BatchAugment(nn.Module):
    """uint8 images + int labels -> augmented normalized float images + soft targets."""

    def __init__(self, config: DataConfig, num_classes: int):
        super().__init__()
        self.config, self.num_classes = config, num_classes
        self.mixing = config.mixup_prob > 0 and (config.mixup_alpha > 0 or config.cutmix_alpha > 0)
        fill = tuple(min(255, round(255 * m)) for m in config.mean)  # timm's img_mean
        self.rand_augment = (RandAugment(config.rand_augment_ops, config.rand_augment_magnitude,
                                         config.rand_augment_magnitude_std, fill)
                             if config.rand_augment_ops else None)
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        # Beta concentrations of (Mixup, CutMix); a disabled one draws from Beta(1, 1), unused.
        alphas = [alpha if alpha > 0 else 1.0 for alpha in (config.mixup_alpha, config.cutmix_alpha)]
        self.register_buffer("alphas", torch.tensor(alphas), persistent=False)

    def _mix(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's Mixup in 'batch' mode, decided on the device: (mixed images, soft targets)."""
        config = self.config
        _, _, height, width = x.shape
        mix_u, switch_u, centre_y, centre_x = torch.rand(4, device=x.device)
        beta = torch.distributions.Beta(self.alphas, self.alphas, validate_args=False)
        lam_mixup, lam_cutmix = beta.sample()
        both = config.mixup_alpha > 0 and config.cutmix_alpha > 0
        cutmix_prob = config.mixup_switch_prob if both else float(config.cutmix_alpha > 0)
        mix = mix_u < config.mixup_prob
        cutmix, mixup = mix & (switch_u < cutmix_prob), mix & (switch_u >= cutmix_prob)
        # timm's rand_bbox: rows cy - h // 2 <= r < cy + h // 2 with h = int(H sqrt(1 - lam)) and
        # cy a uniform row, i.e. pixel centres within h // 2 of cy + 1/2 (clipped at the edges);
        # columns alike. lam is then corrected to the clipped area (correct_lam).
        cut = (1 - lam_cutmix).sqrt()
        rows = torch.arange(0.5, height, device=x.device).view(height, 1)
        cols = torch.arange(0.5, width, device=x.device).view(1, width)
        box = (((rows - (centre_y * height).floor()).abs() < (cut * (height / 2)).floor())
               & ((cols - (centre_x * width).floor()).abs() < (cut * (width / 2)).floor()) & cutmix)
        own = torch.where(mixup, lam_mixup, 1.0)  # the image's own weight in Mixup
        lam = torch.where(cutmix, 1 - box.sum() / (height * width), own)
        paired = x.flip(0)
        x = torch.where(box, paired, torch.lerp(paired, x, own))
        targets = smooth_one_hot(labels, self.num_classes, config.label_smoothing)
        return x, torch.lerp(targets.flip(0), targets, lam)  # timm's mixup_target

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W), int64 (B,) -> float (B, 3, H, W) normalized, float (B, C) summing to 1."""
        config = self.config
        x = images.float()
        if self.rand_augment is not None:
            x = self.rand_augment(x)
        x = (x / 255.0 - self.mean) / self.std
        if config.random_erasing:
            x = _random_erasing(x, config.random_erasing)
        if self.mixing:
            return self._mix(x, labels)
        return x.contiguous(), smooth_one_hot(labels, self.num_classes, config.label_smoothing)
