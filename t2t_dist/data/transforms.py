"""CPU side of the input pipeline: JPEG bytes -> uint8 (H, W, 3) crops, in the DataLoader workers.

Training: RandomResizedCrop (torchvision's sampling: 10 tries of area in ``crop_scale`` and
log-uniform aspect in ``crop_ratio``, else a center crop clamped to the ratio range),
bilinear resize, horizontal flip with probability ``hflip``. The JPEG is decoded with
``Image.draft`` at the largest 1/2, 1/4 or 1/8 scale that still leaves the crop at least
``img_size`` pixels on each side, which makes full-size ImageNet photos much cheaper.

Evaluation: resize the shorter side to ``floor(img_size / eval_crop_pct)`` (248 at 224),
bicubic, and center crop ``img_size``; no draft, to match the reference preprocessing.

All randomness comes from the ``numpy.random.Generator`` passed in, which the loader
seeds from (seed, epoch, sample position): the same sample gets the same crop on resume.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def crop_params(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, crop width, crop height) in a width x height image."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return left, top, crop_w, crop_h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        crop_w, crop_h = round(height * ratio[1]), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_train(data: bytes, img_size: int, *, scale: tuple[float, float],
                 ratio: tuple[float, float], hflip: float, rng: np.random.Generator) -> np.ndarray:
    """JPEG (or PNG) bytes -> random resized crop, maybe flipped: uint8 (img_size, img_size, 3)."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        left, top, crop_w, crop_h = crop_params(width, height, scale, ratio, rng)
        flip = rng.random() < hflip
        # Ask for a decode size at which the crop still spans >= img_size pixels each way.
        wanted = (max(1, width * img_size // crop_w), max(1, height * img_size // crop_h))
        image.draft("RGB", wanted)
        sx, sy = image.size[0] / width, image.size[1] / height
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        out = _rgb(image).resize((img_size, img_size), Image.BILINEAR, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def eval_resize_size(img_size: int, crop_pct: float) -> int:
    """Shorter side before the center crop: floor(img_size / crop_pct), 248 for 224 at 0.9."""
    return int(math.floor(img_size / crop_pct))


def decode_eval(data: bytes, img_size: int, *, crop_pct: float) -> np.ndarray:
    """JPEG bytes -> shorter side resized bicubic, center crop: uint8 (img_size, img_size, 3)."""
    resize = eval_resize_size(img_size, crop_pct)
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if width <= height:
            new_w, new_h = resize, max(1, int(resize * height / width))
        else:
            new_w, new_h = max(1, int(resize * width / height)), resize
        resized = _rgb(image).resize((new_w, new_h), Image.BICUBIC)
    left = int(round((new_w - img_size) / 2.0))
    top = int(round((new_h - img_size) / 2.0))
    return np.asarray(resized.crop((left, top, left + img_size, top + img_size)))
