"""JPEG bytes -> uint8 crops: (H, W, 3) in the DataLoader workers, or (B, 3, S, S) on the GPU.

Training: RandomResizedCrop (torchvision's sampling: 10 tries of area in ``crop_scale`` and
log-uniform aspect in ``crop_ratio``, else a center crop clamped to the ratio range),
bilinear resize with antialiasing, horizontal flip with probability ``hflip``. The JPEG is
decoded with ``Image.draft`` at the largest 1/2, 1/4 or 1/8 scale that still leaves the crop
at least ``img_size`` pixels on each side, which makes full-size ImageNet photos much cheaper.
The resize is torch's uint8 antialiased bilinear kernel (what torchvision's ``Resize`` runs
on tensors) on the crop: ~0.3 ms against ~0.8 ms for Pillow's ``resize`` with the image
copied into and out of Pillow (``benchmarks/loader_overhead.py``), a quarter of the whole
transform on a 500x375 photo. Its pixels
are Pillow's within 2 levels (rounding) except along the crop's border, where Pillow's
filter also reads pixels outside the box.

Evaluation: resize the shorter side to ``floor(img_size / eval_crop_pct)`` (248 at 224),
bicubic, and center crop ``img_size``; no draft, to match the reference preprocessing.

All randomness comes from the ``numpy.random.Generator`` passed in, which the loader
seeds from (seed, epoch, sample position): the same sample gets the same crop on resume.

``decoder``: ``"pil"`` or ``"simplejpeg"``. Both are libjpeg-turbo with the same IDCT and
upsampling, and simplejpeg decodes at the scale Pillow's ``draft`` would pick, so they give
the same pixels; simplejpeg skips Pillow's per-image Python work (header parsing, chunked
reads, RGBX layout), which matters most on small, pre-resized JPEGs
(``benchmarks/input_pipeline.py``). What simplejpeg cannot decode (PNG, CMYK JPEGs) goes
through Pillow.

``decoder="cuda"``: the workers draw the same crops (``train_crop``) and send the JPEG bytes
(``EncodedBatch``); ``decode_batch_on_device`` decodes them with nvJPEG
(``torchvision.io.decode_jpeg(device="cuda")``) and crops, resizes (bilinear, antialiased) and
flips on the GPU. Its pixels are close to, not equal to, the CPU path's (another IDCT, and
the resize in float).
"""

from __future__ import annotations

import io
import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
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


def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        raise ImportError("data.decoder='simplejpeg' needs the simplejpeg package: "
                          "pip install simplejpeg (or data.decoder='pil')") from None
    return simplejpeg


def _simplejpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that simplejpeg decodes to Pillow's pixels (YCbCr or gray);
    None for anything else (PNG, CMYK, bad bytes), which Pillow then decodes or rejects."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    try:
        height, width, colorspace, _ = _simplejpeg().decode_jpeg_header(data)
    except ValueError:
        return None
    return (width, height) if colorspace in ("YCbCr", "Gray") and width and height else None


def _draft_factor(width: int, height: int, wanted: tuple[int, int]) -> int:
    """The reduction 1, 2, 4 or 8 that ``Image.draft(mode, wanted)`` picks for a JPEG."""
    most = min(width // wanted[0], height // wanted[1])
    return next((factor for factor in (8, 4, 2) if most >= factor), 1)


def _decode_simplejpeg(data: bytes, width: int, height: int, factor: int = 1) -> np.ndarray | None:
    """uint8 (ceil(H/factor), ceil(W/factor), 3) RGB; None if libjpeg-turbo fails on the data."""
    try:
        return _simplejpeg().decode_jpeg(data, "RGB", min_width=-(-width // factor),
                                         min_height=-(-height // factor))
    except ValueError:
        return None


def train_crop(width: int, height: int, *, scale: tuple[float, float], ratio: tuple[float, float],
               hflip: float, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
    """RandomResizedCrop's box (left, top, crop width, crop height) and whether to flip: the
    random draws of ``decode_train``, in its order."""
    box = crop_params(width, height, scale, ratio, rng)
    return box, bool(rng.random() < hflip)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header; raises on bytes that are not an image."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def _crop_resize(pixels: np.ndarray, box: tuple[float, float, float, float], img_size: int,
                 flip: bool) -> np.ndarray:
    """The box (left, top, right, bottom; rounded to whole pixels) of uint8 (H, W, 3) pixels,
    resized to img_size x img_size, bilinear with antialiasing, maybe flipped: uint8 (img_size,
    img_size, 3), a view of a (3, img_size, img_size) array, which the loader copies as is."""
    left, top, right, bottom = (round(value) for value in box)
    crop = pixels[top:max(bottom, top + 1), left:max(right, left + 1)]
    if not crop.flags.writeable:  # Pillow's arrays; torch warns on them, and only reads here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            crop = torch.from_numpy(crop)
    else:
        crop = torch.from_numpy(crop)
    out = torch.nn.functional.interpolate(crop.permute(2, 0, 1).unsqueeze(0), size=(img_size, img_size),
                                          mode="bilinear", antialias=True, align_corners=False)[0]
    return (out.flip(-1) if flip else out).permute(1, 2, 0).numpy()


def decode_train(data: bytes, img_size: int, *, scale: tuple[float, float],
                 ratio: tuple[float, float], hflip: float, rng: np.random.Generator,
                 decoder: str = "pil") -> np.ndarray:
    """JPEG (or PNG) bytes -> random resized crop, maybe flipped: uint8 (img_size, img_size, 3)."""
    size = _simplejpeg_size(data) if decoder == "simplejpeg" else None
    if size is not None:
        width, height = size
        state = rng.bit_generator.state  # to draw the same crop again if Pillow must decode
        (left, top, crop_w, crop_h), flip = train_crop(width, height, scale=scale, ratio=ratio,
                                                       hflip=hflip, rng=rng)
        wanted = (max(1, width * img_size // crop_w), max(1, height * img_size // crop_h))
        pixels = _decode_simplejpeg(data, width, height, _draft_factor(width, height, wanted))
        if pixels is not None:
            sx, sy = pixels.shape[1] / width, pixels.shape[0] / height
            box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
            return _crop_resize(pixels, box, img_size, flip)
        rng.bit_generator.state = state
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        (left, top, crop_w, crop_h), flip = train_crop(width, height, scale=scale, ratio=ratio,
                                                       hflip=hflip, rng=rng)
        # Ask for a decode size at which the crop still spans >= img_size pixels each way.
        wanted = (max(1, width * img_size // crop_w), max(1, height * img_size // crop_h))
        image.draft("RGB", wanted)
        sx, sy = image.size[0] / width, image.size[1] / height
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        return _crop_resize(np.asarray(_rgb(image)), box, img_size, flip)


def eval_resize_size(img_size: int, crop_pct: float) -> int:
    """Shorter side before the center crop: floor(img_size / crop_pct), 248 for 224 at 0.9."""
    return int(math.floor(img_size / crop_pct))


def eval_resize_shape(width: int, height: int, img_size: int, crop_pct: float) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to ``eval_resize_size``."""
    resize = eval_resize_size(img_size, crop_pct)
    if width <= height:
        return resize, max(1, int(resize * height / width))
    return max(1, int(resize * width / height)), resize


def decode_eval(data: bytes, img_size: int, *, crop_pct: float, decoder: str = "pil") -> np.ndarray:
    """JPEG bytes -> shorter side resized bicubic, center crop: uint8 (img_size, img_size, 3)."""
    size = _simplejpeg_size(data) if decoder == "simplejpeg" else None
    pixels = _decode_simplejpeg(data, *size) if size is not None else None
    with (Image.fromarray(pixels) if pixels is not None else Image.open(io.BytesIO(data))) as image:
        width, height = image.size
        new_w, new_h = eval_resize_shape(width, height, img_size, crop_pct)
        resized = _rgb(image).resize((new_w, new_h), Image.BICUBIC)
    left = int(round((new_w - img_size) / 2.0))
    top = int(round((new_h - img_size) / 2.0))
    return np.asarray(resized.crop((left, top, left + img_size, top + img_size)))


def check_decoder(decoder: str) -> None:
    """Fail in one line, before any worker starts, if ``data.decoder`` cannot run here."""
    if decoder == "simplejpeg":
        _simplejpeg()
    elif decoder == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("data.decoder='cuda' needs a CUDA device: none is visible here "
                               "(expected data.decoder='pil' or 'simplejpeg' on CPU machines)")
        try:
            import torchvision.io  # noqa: F401
        except ImportError:
            raise ImportError("data.decoder='cuda' needs torchvision (the build that matches "
                              "torch): pip install 't2t-dist[gpu]'") from None


class EncodedBatch(NamedTuple):
    """A batch's JPEG bytes and crops, for ``decode_batch_on_device``. Slot k's bytes are
    ``data[offsets[k]:offsets[k + 1]]`` (none: a zero image); its box is (left, top, width,
    height), or -1s for the evaluation transform."""

    data: torch.Tensor  # (total bytes,) uint8
    offsets: torch.Tensor  # (B + 1,) int64
    boxes: torch.Tensor  # (B, 4) int64
    flips: torch.Tensor  # (B,) bool

    @classmethod
    def pack(cls, slots: list) -> "EncodedBatch":
        """From (bytes, box or None, flip) or None per slot."""
        present = [slot if slot is not None else (b"", None, False) for slot in slots]
        sizes = [len(image) for image, _, _ in present]
        offsets = torch.tensor([0, *np.cumsum(sizes).tolist()], dtype=torch.int64)
        data = torch.frombuffer(bytearray(b"".join(image for image, _, _ in present)) or
                                bytearray(1), dtype=torch.uint8)[:int(offsets[-1])]
        boxes = torch.tensor([box if box is not None else (-1, -1, -1, -1)
                              for _, box, _ in present], dtype=torch.int64).reshape(-1, 4)
        flips = torch.tensor([flip for _, _, flip in present], dtype=torch.bool)
        return cls(data, offsets, boxes, flips)


def _decode_one_on_device(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """(3, H, W) uint8 on ``device``: nvJPEG, else Pillow (PNG, CMYK); None if neither can."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
                pixels = np.asarray(_rgb(image))
        except Exception:  # the worker read the header; what the data cannot show stays zeros
            return None
        return torch.from_numpy(pixels).permute(2, 0, 1).to(device)


def decode_batch_on_device(batch: EncodedBatch, img_size: int, *, train: bool, crop_pct: float,
                           device: torch.device | None = None) -> torch.Tensor:
    """Decode, crop, resize and flip a batch on the GPU: uint8 (B, 3, img_size, img_size)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = device or torch.device("cuda", torch.cuda.current_device())
    offsets = batch.offsets.tolist()
    out = torch.zeros((len(offsets) - 1, 3, img_size, img_size), dtype=torch.uint8, device=device)
    present = [k for k in range(len(offsets) - 1) if offsets[k + 1] > offsets[k]]
    encoded = [batch.data[offsets[k]:offsets[k + 1]] for k in present]
    try:  # one batched nvJPEG call
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # some image is not a JPEG nvJPEG takes: one at a time
        decoded = [_decode_one_on_device(data, device) for data in encoded]
    for k, image in zip(present, decoded):
        if image is None:
            continue
        image = image.unsqueeze(0).float()  # (1, 3, H, W)
        if train:
            left, top, width, height = batch.boxes[k].tolist()
            image = torch.nn.functional.interpolate(
                image[..., top:top + height, left:left + width], size=(img_size, img_size),
                mode="bilinear", antialias=True, align_corners=False)
            if batch.flips[k]:
                image = image.flip(-1)
        else:
            new_w, new_h = eval_resize_shape(image.shape[-1], image.shape[-2], img_size, crop_pct)
            image = torch.nn.functional.interpolate(image, size=(new_h, new_w), mode="bicubic",
                                                    antialias=True, align_corners=False)
            left, top = int(round((new_w - img_size) / 2.0)), int(round((new_h - img_size) / 2.0))
            image = image[..., top:top + img_size, left:left + img_size]
        out[k] = image[0].round().clamp(0, 255).to(torch.uint8)
    return out
