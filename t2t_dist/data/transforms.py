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
(``EncodedBatch``); ``decode_batch_on_device`` decodes them with one batched nvJPEG call
(``torchvision.io.decode_jpeg(device="cuda")``), then ``crop_resize_batch`` crops, resizes and
flips the whole batch in a fixed number of launches, with the CPU path's filters (its pixels
within 1-2 levels of the CPU path's on the same decoded image). The decode itself differs:
nvJPEG (as torchvision opens it) upsamples 4:2:0 chroma nearest-neighbour where libjpeg-turbo
interpolates ("fancy" upsampling), which moves pixels by 0.4 (smooth photos) to 1.7-1.8
(textured photos) levels on average and by ~7 on pure noise, and it has its own IDCT (<= 1
level); 4:4:4 JPEGs have no chroma to upsample. Full-size photos are decoded at full size, not
at ``draft``'s reduced scale (``benchmarks/dali_decode.py --causes``).
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
    try:  # optional: data.decoder='pil' runs without it
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
        try:  # optional (the gpu extra): only data.decoder='cuda' needs it
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
    from torchvision.io import ImageReadMode, decode_jpeg  # optional: the gpu extra

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
    """Decode, crop, resize and flip a batch on the GPU: uint8 (B, 3, img_size, img_size).
    One batched nvJPEG call, then ``crop_resize_batch``: a fixed number of launches per batch."""
    from torchvision.io import ImageReadMode, decode_jpeg  # optional: the gpu extra

    device = device or torch.device("cuda", torch.cuda.current_device())
    offsets = batch.offsets.tolist()
    present = [k for k in range(len(offsets) - 1) if offsets[k + 1] > offsets[k]]
    encoded = [batch.data[offsets[k]:offsets[k + 1]] for k in present]
    try:  # one batched nvJPEG call
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device) if encoded else []
    except RuntimeError:  # some image is not a JPEG nvJPEG takes: one at a time
        decoded = [_decode_one_on_device(data, device) for data in encoded]
    images: list = [None] * (len(offsets) - 1)
    for k, image in zip(present, decoded):
        images[k] = image
    return crop_resize_batch(images, img_size, boxes=batch.boxes if train else None,
                             flips=batch.flips, crop_pct=crop_pct, device=device)


# The CPU path's filters, as Pillow and torch's antialiased kernels evaluate them: (support at
# scale 1, weight of a tap at distance x in output pixels).
def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp(min=0.0)


def _keys_cubic(x: torch.Tensor) -> torch.Tensor:  # Pillow's bicubic, a = -0.5
    x = x.abs()
    near = (1.5 * x - 2.5) * x * x + 1.0
    far = ((x - 5.0) * x + 8.0) * x * -0.5 + 2.0
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


_FILTERS = {"bilinear": (1.0, _triangle), "bicubic": (2.0, _keys_cubic)}


class _AxisTaps(NamedTuple):
    """One axis of a batch's resampling, on the host (float64): output pixel i of image b
    averages source pixels [low[b] + first[b, i], low[b] + end[b, i]) around
    ``low[b] + center[b, i] - 0.5`` with the filter stretched by ``stretch[b]``."""

    low: torch.Tensor  # (B,) first source pixel the filter may read (the crop's edge)
    center: torch.Tensor  # (B, S) relative to low
    first: torch.Tensor  # (B, S)
    end: torch.Tensor  # (B, S)
    stretch: torch.Tensor  # (B,) max(source pixels per output pixel, 1)

    def window(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) int64: the first source pixel any output reads, and how many it spans."""
        first, end = self.first.min(dim=1).values, self.end.max(dim=1).values
        return (self.low + first).long(), (end - first).long()

    def take(self, index: torch.Tensor) -> "_AxisTaps":
        return _AxisTaps(*(field[index] for field in self))


def _axis_taps(origin: list[float], step: list[float], low: list[int], high: list[int],
               size: int, support: float, flips: list[bool] | None = None) -> _AxisTaps:
    """Pillow's tap ranges (``ImagingResample``; torch's antialiased kernels compute the same)
    for outputs starting at ``origin`` with ``step`` source pixels each, reading [low, high)."""
    as_float = dict(dtype=torch.float64)
    origin, step = torch.tensor(origin, **as_float), torch.tensor(step, **as_float)
    low, high = torch.tensor(low, **as_float), torch.tensor(high, **as_float)
    stretch = step.clamp(min=1.0)
    center = (origin - low)[:, None] + (torch.arange(size, **as_float) + 0.5) * step[:, None]
    reach = (support * stretch)[:, None]
    first = (center - reach + 0.5).floor().clamp(min=0.0)  # Pillow truncates, then clamps to 0
    end = torch.minimum((center + reach + 0.5).floor(), (high - low)[:, None])
    if flips is not None:  # a flipped image's outputs in reverse order
        flipped = torch.tensor(flips, dtype=torch.bool)[:, None]
        center, first, end = (torch.where(flipped, t.flip(1), t) for t in (center, first, end))
    return _AxisTaps(low, center, first, end, stretch)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device``, without waiting for the GPU's queued work (a
    blocking copy would synchronize the stream)."""
    return tensor.to(device, non_blocking=True)


def _dense_weights(taps: _AxisTaps, width: int, kernel: str, device: torch.device) -> torch.Tensor:
    """(B, S, width) float32: output i's weights on the source pixels window()[0] + [0, width),
    normalised like Pillow's and zero outside each output's taps."""
    support, filter_fn = _FILTERS[kernel]
    center, first, end, stretch = (_to(t, device) for t in (taps.center, taps.first, taps.end,
                                                             taps.stretch))
    start = first.min(dim=1, keepdim=True).values  # (B, 1)
    source = start[..., None] + torch.arange(width, dtype=torch.float64, device=device)  # (B, 1, W)
    weights = filter_fn((source + 0.5 - center[..., None]) / stretch[:, None, None])
    weights = weights * ((source >= first[..., None]) & (source < end[..., None]))
    return (weights / weights.sum(dim=-1, keepdim=True)).float()


# Windows of one group of images together, in pixels (x 3 channels x 4 bytes as float32, plus
# half that for the horizontal pass): a batch of 256 ImageNet photos (~500x375) is one group; a
# few multi-megapixel photos get groups of their own instead of padding the whole batch.
GROUP_WINDOW_PIXELS = 1 << 26


def _window_groups(rows: list[int], cols: list[int], budget: int) -> list[list[int]]:
    """Indices split into groups whose padded windows (count x max rows x max cols) stay within
    ``budget`` pixels (a single larger window is a group of its own); by size, so a batch of
    like images is one group."""
    groups: list[list[int]] = []
    most_rows = most_cols = 0
    for index in sorted(range(len(rows)), key=lambda k: rows[k] * cols[k]):
        grown_rows, grown_cols = max(most_rows, rows[index]), max(most_cols, cols[index])
        if groups and (len(groups[-1]) + 1) * grown_rows * grown_cols <= budget:
            groups[-1].append(index)
            most_rows, most_cols = grown_rows, grown_cols
        else:
            groups.append([index])
            most_rows, most_cols = rows[index], cols[index]
    return groups


def _resample_group(flat: torch.Tensor, plane_starts: torch.Tensor, heights: torch.Tensor,
                    widths: torch.Tensor, x_taps: _AxisTaps, y_taps: _AxisTaps, img_size: int,
                    kernel: str) -> torch.Tensor:
    """(G, 3, S, S) uint8 from the images whose channel c starts at flat[plane_starts + c * H * W]."""
    device = flat.device
    (x0, x_span), (y0, y_span) = x_taps.window(), y_taps.window()
    cols, rows = int(x_span.max()), int(y_span.max())
    row = torch.minimum(y0[:, None] + torch.arange(rows), heights[:, None] - 1)  # (G, rows)
    starts = (plane_starts[:, None, None] + torch.arange(3) * (heights * widths)[:, None, None]
              + (row * widths[:, None] + x0[:, None])[..., None])  # (G, rows, 3)
    # Row r of the unfolded view is flat[r:r + cols]: one gather of G x rows x 3 row starts.
    # Columns past an image's window read its neighbours' bytes; their weights are 0.
    windows = flat.unfold(0, cols, 1).index_select(0, _to(starts.reshape(-1), device))
    windows = windows.view(len(row), rows * 3, cols).float()
    across = _dense_weights(x_taps, cols, kernel, device).transpose(1, 2)  # (G, cols, S)
    down = _dense_weights(y_taps, rows, kernel, device)  # (G, S, rows)
    half = torch.bmm(windows, across).round_().clamp_(0, 255)  # (G, rows * 3, S)
    resized = torch.bmm(down, half.view(len(row), rows, 3 * img_size))  # (G, S, 3 * S)
    resized = resized.round_().clamp_(0, 255).view(len(row), img_size, 3, img_size)
    return resized.permute(0, 2, 1, 3).to(torch.uint8)


def crop_resize_batch(images: list, img_size: int, *, boxes: torch.Tensor | None,
                      flips: torch.Tensor, crop_pct: float,
                      device: torch.device | None = None) -> torch.Tensor:
    """The CPU path's crop + resize + flip for a whole batch of decoded images at once:
    uint8 (B, 3, img_size, img_size) on ``device``.

    ``images``: (3, H_k, W_k) uint8 tensors (any sizes; None: a zero image), on the CPU or one
    GPU. ``boxes``: (B, 4) training boxes (left, top, width, height), resized bilinear with
    antialiasing and flipped where ``flips``; None: the evaluation transform (shorter side to
    ``eval_resize_size``, bicubic, center crop), as a box in the source image.

    Both are Pillow's separable filters (``ImagingResample``, which torch's antialiased kernels
    copy): the taps and weights of every output pixel, so no supersampling and no cap on the
    downscale. Per image and axis they form one dense (S, window) weight matrix over the source
    pixels its taps read. The images go into one flat buffer; the rows of every window are
    gathered into one padded (B, rows x 3, cols) tensor by a single ``index_select`` on an
    unfolded view of it (an index per row, not per pixel); then two batched matmuls, horizontal
    then vertical, rounded to uint8 in between as Pillow and torch's uint8 kernel do. That is a
    fixed number of launches whatever B, per group of ``GROUP_WINDOW_PIXELS`` (one group for a
    batch of ImageNet-sized photos); memory ~15 bytes per window pixel plus 12 x S per row.

    On the same decoded pixels (``tests/test_data_batch_resize.py``): training crops against
    ``_crop_resize`` (torch's uint8 kernel) differ by 0.006 (img_size 224) to 0.04 (24) levels
    on average, <= 0.2 for any image, 2 at most, on < 0.02% of pixels (uint8 rounding between
    the passes); evaluation crops against ``decode_eval``'s Pillow bicubic by <= 0.0012 on
    average, 1 at most (2 once at 224): fixed-point against float weights. With TF32 matmuls
    enabled on the GPU, ~3% of pixels move by 1 more level (the weights lose precision).
    """
    present = [k for k, image in enumerate(images) if image is not None]
    if device is None:
        device = images[present[0]].device if present else torch.device("cpu")
    out = torch.zeros((len(images), 3, img_size, img_size), dtype=torch.uint8, device=device)
    if not present:
        return out
    heights = torch.tensor([images[k].shape[-2] for k in present])
    widths = torch.tensor([images[k].shape[-1] for k in present])
    if boxes is not None:  # RandomResizedCrop: the box, read only inside itself
        left, top, crop_w, crop_h = boxes[present].T.tolist()
        kernel, support = "bilinear", _FILTERS["bilinear"][0]
        x_taps = _axis_taps(left, [w / img_size for w in crop_w], left,
                            [a + w for a, w in zip(left, crop_w)], img_size, support,
                            flips[present].tolist())
        y_taps = _axis_taps(top, [h / img_size for h in crop_h], top,
                            [a + h for a, h in zip(top, crop_h)], img_size, support)
    else:  # resize the whole image, then center crop: a box in the source image
        kernel, support = "bicubic", _FILTERS["bicubic"][0]
        shapes = [eval_resize_shape(w, h, img_size, crop_pct)
                  for w, h in zip(widths.tolist(), heights.tolist())]
        step_x = [w / new_w for w, (new_w, _) in zip(widths.tolist(), shapes)]
        step_y = [h / new_h for h, (_, new_h) in zip(heights.tolist(), shapes)]
        left = [int(round((new_w - img_size) / 2.0)) * s for (new_w, _), s in zip(shapes, step_x)]
        top = [int(round((new_h - img_size) / 2.0)) * s for (_, new_h), s in zip(shapes, step_y)]
        zeros = [0] * len(present)
        x_taps = _axis_taps(left, step_x, zeros, widths.tolist(), img_size, support)
        y_taps = _axis_taps(top, step_y, zeros, heights.tolist(), img_size, support)
    x_span, y_span = x_taps.window()[1], y_taps.window()[1]
    # One flat buffer of all images (and a window's width of zeros, so every row read fits).
    flat = torch.cat([images[k].to(device).reshape(-1) for k in present]
                     + [torch.zeros(int(x_span.max()), dtype=torch.uint8, device=device)])
    sizes = 3 * heights * widths
    plane_starts = torch.cumsum(sizes, 0) - sizes
    slots = torch.tensor(present)
    for group in _window_groups(y_span.tolist(), x_span.tolist(), GROUP_WINDOW_PIXELS):
        index = torch.tensor(group)
        out[_to(slots[index], device)] = _resample_group(
            flat, plane_starts[index], heights[index], widths[index], x_taps.take(index),
            y_taps.take(index), img_size, kernel)
    return out
