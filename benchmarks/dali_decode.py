"""NVIDIA DALI against our decode path, on the same JPEG bytes and the same crops, in images/s.

  DALI: ``fn.external_source`` (JPEG bytes, crop anchors and shapes, flips) ->
        ``fn.decoders.image_slice`` (region-of-interest decode: libjpeg-turbo on ``cpu``,
        nvJPEG on ``mixed``) -> ``fn.resize`` to S x S (linear, antialiased) -> ``fn.flip``;
  ours: ``decode_train(decoder="simplejpeg")`` image by image on the CPU (what a DataLoader
        worker runs), and, where CUDA is present, ``decode_batch_on_device`` (one batched nvJPEG
        call + ``crop_resize_batch``) on the batch's bytes.

Both get the boxes and flips that ``train_crop`` draws with the loader's seeds (seed 0, epoch 0,
the sample's position), so they do the same work; each row also prints how far its crops are
from the CPU path's (mean / max |diff| in levels), the evidence that it does. The images are
``input_pipeline.py``'s 500x375 photo-like JPEGs (quality 90, 4:2:0). On CUDA, DALI's mixed
decoder also runs with ``jpeg_fancy_upsampling=True`` (nvJPEG's interpolated chroma, which
torchvision does not expose): how close nvJPEG can come to the CPU path's pixels.

CPU rows run on one core (DALI ``num_threads=1``, torch on one thread), as one DataLoader worker
would; "images/CPU-s" counts all of the process's threads (DALI's executor too); each figure is
the best of ``--rounds``. DALI with more threads is also shown for its wall-clock rate.

``--causes`` prints instead where the GPU path's pixels differ from the CPU path's, one cause
at a time, on the CPU (no DALI needed): libjpeg-turbo's nearest-neighbour chroma upsampling
(simplejpeg ``fastupsample``; nvJPEG's default, as torchvision and DALI's mixed decoder open it),
another IDCT (libjpeg's IFAST, a cruder one than nvJPEG's presumably), the per-image float resize
``decode_batch_on_device`` ran before ``crop_resize_batch``, and ``crop_resize_batch``; on the GPU
test's images (noise, 48x40, img_size 24) and on photo-like, smooth and digit images.

    .venv/bin/pip install nvidia-dali-cuda130   # not a project dependency
    .venv/bin/python benchmarks/dali_decode.py
    .venv/bin/python benchmarks/dali_decode.py --count 512 --batch 128 --rounds 5
    .venv/bin/python benchmarks/dali_decode.py --causes
"""

from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from input_pipeline import photo_like_jpegs

from t2t_dist.data.transforms import (EncodedBatch, _draft_factor, crop_resize_batch,
                                      decode_batch_on_device, decode_eval, decode_train,
                                      eval_resize_shape, train_crop)

SCALE, RATIO, HFLIP = (0.08, 1.0), (3 / 4, 4 / 3), 0.5


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _sizes(blobs: list[bytes]) -> list[tuple[int, int]]:
    import simplejpeg

    return [simplejpeg.decode_jpeg_header(data)[1::-1] for data in blobs]


def crops(blobs: list[bytes]) -> list[tuple[tuple[int, int, int, int], bool]]:
    """(box, flip) per image, as the loader draws them at epoch 0, position k."""
    return [train_crop(width, height, scale=SCALE, ratio=RATIO, hflip=HFLIP,
                       rng=np.random.default_rng([0, 0, position]))
            for position, (width, height) in enumerate(_sizes(blobs))]


def ours_cpu(blobs: list[bytes], img_size: int) -> np.ndarray:
    """(N, S, S, 3) uint8: the CPU path, image by image."""
    return np.stack([decode_train(data, img_size, scale=SCALE, ratio=RATIO, hflip=HFLIP,
                                  rng=np.random.default_rng([0, 0, position]), decoder="simplejpeg")
                     for position, data in enumerate(blobs)])


def packed_batches(blobs: list[bytes], batch: int) -> list[EncodedBatch]:
    """The batches as the DataLoader workers send them with ``data.decoder="cuda"``."""
    drawn = crops(blobs)
    return [EncodedBatch.pack([(data, box, flip) for data, (box, flip)
                               in zip(blobs[start:start + batch], drawn[start:start + batch])])
            for start in range(0, len(blobs), batch)]


def ours_cuda(batches: list[EncodedBatch], img_size: int) -> np.ndarray:
    """(N, S, S, 3) uint8: ``decode_batch_on_device`` per batch."""
    out = [decode_batch_on_device(packed, img_size, train=True, crop_pct=0.875) for packed in batches]
    torch.cuda.synchronize()
    return torch.cat(out).permute(0, 2, 3, 1).cpu().numpy()


def dali_pipeline(blobs: list[bytes], img_size: int, batch: int, device: str, threads: int,
                  fancy: bool = False):
    """A built DALI pipeline that yields the crops of ``blobs``, ``batch`` at a time (cycling);
    ``fancy``: nvJPEG upsamples chroma as libjpeg-turbo does (``mixed`` only)."""
    from nvidia.dali import fn, pipeline_def, types

    drawn = crops(blobs)
    samples = [(np.frombuffer(data, dtype=np.uint8), np.array(box[:2], dtype=np.int32),
                np.array(box[2:], dtype=np.int32), np.array(int(flip), dtype=np.int32))
               for data, (box, flip) in zip(blobs, drawn)]

    def source(info):  # one batch of (bytes, anchor (x, y), shape (w, h), flip)
        start = (info.iteration * batch) % len(samples)
        return [list(column) for column in zip(*samples[start:start + batch])]

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=0 if device == "mixed" else None,
                  prefetch_queue_depth=1)
    def pipeline():
        jpegs, anchors, shapes, flips = fn.external_source(source=source, num_outputs=4, batch=True,
                                                           batch_info=True)
        images = fn.decoders.image_slice(jpegs, anchors, shapes, device=device, output_type=types.RGB,
                                         axis_names="WH", normalized_anchor=False,
                                         normalized_shape=False, jpeg_fancy_upsampling=fancy)
        images = fn.resize(images, resize_x=img_size, resize_y=img_size,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        return fn.flip(images, horizontal=flips)

    built = pipeline()
    built.build()
    return built


def dali_run(built, batches: int) -> np.ndarray:
    """(batches x batch, S, S, 3) uint8 from a built DALI pipeline."""
    out = []
    for _ in range(batches):
        (images,) = built.run()
        out.append(images.as_cpu().as_array())  # a copy from the GPU for "mixed"
    return np.concatenate(out)


def timed(run, rounds: int) -> tuple[float, float, np.ndarray]:
    """(best images/s wall, best images per CPU-second, the last output)."""
    best_wall = best_cpu = float("inf")
    for _ in range(rounds):
        wall, cpu = time.perf_counter(), cpu_seconds()
        out = run()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, cpu_seconds() - cpu)
    return len(out) / best_wall, len(out) / best_cpu, out


def _jpeg(pixels: np.ndarray, subsampling: str) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90,
                                 subsampling={"4:2:0": 2, "4:4:4": 0}[subsampling])
    return out.getvalue()


def cause_images(subsampling: str) -> dict[str, tuple[list[bytes], int]]:
    """name -> (JPEGs, img_size): the GPU test's noise (conftest's generator), and others."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 255, (40, 48, 3), dtype=np.uint8) for _ in range(48)]
    rng = np.random.default_rng(0)
    digits = []
    for digit in load_digits().images[:48] / 16.0:  # two random colors, upscaled to 48x40
        ink, paper = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        small = (digit[..., None] * ink + (1 - digit[..., None]) * paper).astype(np.uint8)
        digits.append(np.asarray(Image.fromarray(small).resize((48, 40), Image.BICUBIC)))
    rng = np.random.default_rng(0)
    smooth, photos = [], []
    for _ in range(16):  # input_pipeline.py's photos, and their smooth part alone
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        smooth.append(np.asarray(coarse.resize((500, 375), Image.BICUBIC)))
        texture = rng.normal(0, 18, smooth[-1].shape)
        photos.append(np.clip(smooth[-1] + texture, 0, 255).astype(np.uint8))
    sets = {"noise 48x40 (GPU test)": (noise, 24), "digits 48x40": (digits, 24),
            "photo-like 500x375": (photos, 224), "smooth 500x375": (smooth, 224)}
    return {f"{name}, {subsampling}": ([_jpeg(image, subsampling) for image in images], size)
            for name, (images, size) in sets.items()}


def _old_gpu_resize(image: torch.Tensor, img_size: int, box, flip: bool) -> torch.Tensor:
    """The per-image float resize ``decode_batch_on_device`` ran before ``crop_resize_batch``."""
    from torch.nn.functional import interpolate

    image = image[None].float()
    if box is not None:
        left, top, width, height = box
        image = interpolate(image[..., top:top + height, left:left + width], size=(img_size, img_size),
                            mode="bilinear", antialias=True, align_corners=False)
        image = image.flip(-1) if flip else image
    else:
        new_w, new_h = eval_resize_shape(image.shape[-1], image.shape[-2], img_size, 0.875)
        image = interpolate(image, size=(new_h, new_w), mode="bicubic", antialias=True,
                            align_corners=False)
        left, top = int(round((new_w - img_size) / 2.0)), int(round((new_h - img_size) / 2.0))
        image = image[..., top:top + img_size, left:left + img_size]
    return image[0].round().clamp(0, 255).to(torch.uint8)


def causes() -> None:
    """Mean / max |diff| against the CPU path, one cause at a time, training and evaluation."""
    import simplejpeg

    decoders = {"libjpeg-turbo, fancy chroma (the CPU path)": {},
                "nearest chroma": {"fastupsample": True}, "IFAST IDCT": {"fastdct": True}}
    print("| images | decode | resize | train: mean / max | eval: mean / max |")
    print("| --- | --- | --- | --- | --- |")
    for subsampling in ("4:2:0", "4:4:4"):
        for name, (blobs, size) in cause_images(subsampling).items():
            drawn = crops(blobs)
            # crops the CPU path decodes at a reduced scale (draft), which the GPU path cannot
            drafted = sum(_draft_factor(*whole, (max(1, whole[0] * size // box[2]),
                                                 max(1, whole[1] * size // box[3]))) > 1
                          for whole, (box, _) in zip(_sizes(blobs), drawn))
            name = f"{name} (drafted: {drafted}/{len(blobs)})"
            cpu_train = torch.from_numpy(ours_cpu(blobs, size)).permute(0, 3, 1, 2)
            cpu_eval = torch.from_numpy(np.stack([decode_eval(data, size, crop_pct=0.875)
                                                  for data in blobs])).permute(0, 3, 1, 2)
            for decoder, options in decoders.items():
                images = [torch.from_numpy(simplejpeg.decode_jpeg(data, "RGB", **options))
                          .permute(2, 0, 1).contiguous() for data in blobs]
                boxes = torch.tensor([box for box, _ in drawn])
                flips = torch.tensor([flip for _, flip in drawn])
                resized = {"crop_resize_batch": [
                    crop_resize_batch(images, size, boxes=boxes, flips=flips, crop_pct=0.875),
                    crop_resize_batch(images, size, boxes=None, flips=flips, crop_pct=0.875)],
                    "old per-image float": [
                    torch.stack([_old_gpu_resize(image, size, box, flip)
                                 for image, (box, flip) in zip(images, drawn)]),
                    torch.stack([_old_gpu_resize(image, size, None, False) for image in images])]}
                for resize, (train, evaluation) in resized.items():
                    cells = []
                    for got, reference in ((train, cpu_train), (evaluation, cpu_eval)):
                        difference = (got.int() - reference.int()).abs()
                        cells.append(f"{difference.float().mean():.2f} / {difference.max()}")
                    print(f"| {name} | {decoder} | {resize} | {cells[0]} | {cells[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=256, help="images (a multiple of --batch)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="DALI's extra multi-threaded row")
    parser.add_argument("--causes", action="store_true",
                        help="print why the GPU path's pixels differ instead (CPU, no DALI)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.causes:
        return causes()
    with tempfile.TemporaryDirectory(prefix="dali-") as scratch:
        photo_like_jpegs(Path(scratch), args.count)
        blobs = [path.read_bytes() for path in sorted(Path(scratch).rglob("*.jpg"))]
    size, batch = args.img_size, args.batch

    rows = [("ours: decode_train, simplejpeg, 1 thread", lambda: ours_cpu(blobs, size))]
    pipelines = {threads: dali_pipeline(blobs, size, batch, "cpu", threads)
                 for threads in sorted({1, args.threads})}
    for threads, built in pipelines.items():
        rows.append((f"DALI cpu, {threads} thread{'s' * (threads > 1)}",
                     lambda built=built: dali_run(built, len(blobs) // batch)))
    if torch.cuda.is_available():
        batches = packed_batches(blobs, batch)
        rows.append(("ours: decode_batch_on_device (nvJPEG)", lambda: ours_cuda(batches, size)))
        for fancy in (False, True):
            mixed = dali_pipeline(blobs, size, batch, "mixed", args.threads, fancy)
            rows.append((f"DALI mixed (nvJPEG{', fancy chroma' * fancy}), {args.threads} threads",
                         lambda mixed=mixed: dali_run(mixed, len(blobs) // batch)))

    print(f"{len(blobs)} JPEGs 500x375 q90 4:2:0 ({np.mean([len(b) for b in blobs]) / 1024:.0f} KB), "
          f"RandomResizedCrop to {size}, batch {batch}, best of {args.rounds}")
    print("| decode + crop + resize + flip | images/s | images/CPU-s | vs the CPU path: mean / max |")
    print("| --- | --- | --- | --- |")
    reference = None
    for name, run in rows:
        wall_rate, cpu_rate, out = timed(run, args.rounds)
        reference = out if reference is None else reference
        difference = np.abs(out.astype(np.int16) - reference.astype(np.int16))
        print(f"| {name} | {wall_rate:.0f} | {cpu_rate:.0f} | "
              f"{difference.mean():.2f} / {difference.max()} |")


if __name__ == "__main__":
    main()
