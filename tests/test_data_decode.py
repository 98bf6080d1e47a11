"""CPU decoders: simplejpeg gives Pillow's pixels, so data.decoder changes no batch; the worker
side of the GPU decoder (bytes + crops) keeps the order and the crops; bad settings fail in one line."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from t2t_dist.config import DataConfig
from t2t_dist.config.base import ConfigError
from t2t_dist.data import (build_train_loader, build_val_loader, load_shard_table, manifest_pattern,
                           write_shards)
from t2t_dist.data.loader import _BatchMaker, _Plan
from t2t_dist.data.transforms import EncodedBatch, decode_eval, decode_train, train_crop

pytest.importorskip("simplejpeg")


def _encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def _images() -> dict[str, bytes]:
    """Photo-like RGB at several sizes (so draft scales 1, 2, 4, 8 all occur), and the odd ones."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    photo = np.asarray(coarse.resize((500, 375), Image.BICUBIC), dtype=np.float32)
    photo = Image.fromarray(np.clip(photo + rng.normal(0, 18, photo.shape), 0, 255).astype(np.uint8))
    return {"500x375": _encode(photo, quality=90), "2000x1500": _encode(photo.resize((2000, 1500))),
            "37x23": _encode(photo.resize((37, 23))), "gray": _encode(photo.convert("L")),
            "progressive": _encode(photo, progressive=True), "444": _encode(photo, subsampling=0),
            "cmyk": _encode(photo.convert("CMYK")), "png": _encode(photo, "PNG")}


@pytest.mark.parametrize("img_size", [16, 64, 224])
def test_simplejpeg_gives_pillows_pixels(img_size):
    for name, data in _images().items():
        for seed in range(6):
            crops = [decode_train(data, img_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                                  rng=np.random.default_rng(seed), decoder=decoder)
                     for decoder in ("pil", "simplejpeg")]
            assert crops[0].shape == (img_size, img_size, 3)
            np.testing.assert_array_equal(crops[0], crops[1], err_msg=f"{name}, seed {seed}")
        evals = [decode_eval(data, img_size, crop_pct=0.9, decoder=decoder)
                 for decoder in ("pil", "simplejpeg")]
        np.testing.assert_array_equal(evals[0], evals[1], err_msg=name)


def test_simplejpeg_rejects_what_pillow_rejects():
    broken = _images()["500x375"][:2000] + b"\0" * 100
    for decoder in ("pil", "simplejpeg"):
        with pytest.raises(Exception):
            decode_train(b"\xff\xd8\xff" + b"\0" * 500, 16, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                         hflip=0.5, rng=np.random.default_rng(0), decoder=decoder)
        with pytest.raises(Exception):
            decode_eval(broken, 16, crop_pct=0.9, decoder=decoder)


@pytest.fixture
def shards(image_tree, tmp_path):
    manifest = write_shards(image_tree(48, side=40), tmp_path / "out", prefix="dec", samples_per_shard=10,
                            processes=1)
    return manifest_pattern(str(tmp_path / "out"), manifest)


def _batches(loader):
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_loader_batches_are_the_same_with_each_cpu_decoder(shards):
    def config(decoder):
        return DataConfig(train_urls=shards, val_urls=shards, loader_workers=2, shard_interleave=3,
                          eval_batch=7, decoder=decoder)

    runs = []
    for decoder in ("pil", "simplejpeg"):
        train = build_train_loader(config(decoder), img_size=24, micro_batch=8)
        train.set_epoch(2)
        runs.append(_batches(train) + _batches(build_val_loader(config(decoder), img_size=24)))
    assert len(runs[0]) == len(runs[1]) == 6 + 7
    for (images, labels), (images_sj, labels_sj) in zip(*runs):
        assert torch.equal(labels, labels_sj) and torch.equal(images, images_sj)


def test_gpu_decoder_workers_send_the_same_samples_and_crops(shards):
    """The worker side of data.decoder="cuda", on the CPU: each slot's bytes are the sample
    the CPU path decodes there, with the crop and flip the CPU path draws."""
    table = load_shard_table(shards)
    makers = {decoder: _BatchMaker(_Plan(table, DataConfig(train_urls=shards, decoder=decoder,
                                                           shard_interleave=3),
                                         24, True, 1, 2, 8, 3, 0, 3))
              for decoder in ("pil", "cuda")}
    for index in range(3):
        images, labels, counts = makers["pil"].make(index)
        encoded, labels_gpu, counts_gpu = makers["cuda"].make(index)
        assert isinstance(encoded, EncodedBatch) and torch.equal(labels, labels_gpu)
        assert torch.equal(counts, counts_gpu) and encoded.offsets.shape == (9,)
        first = (index * 2 + 1) * 8  # rank 1 of 2: global batch 2 * index + 1
        for k in range(8):
            data = encoded.data[encoded.offsets[k]:encoded.offsets[k + 1]].numpy().tobytes()
            with Image.open(io.BytesIO(data)) as image:
                size = image.size
            rng = np.random.default_rng([0, 3, first + k])
            box, flip = train_crop(*size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, rng=rng)
            assert encoded.boxes[k].tolist() == list(box) and bool(encoded.flips[k]) == flip
            again = decode_train(data, 24, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                                 rng=np.random.default_rng([0, 3, first + k]))
            assert np.array_equal(again.transpose(2, 0, 1), images[k].numpy())


def test_decoder_settings_fail_in_one_line(shards):
    with pytest.raises(ConfigError, match=r"data.decoder='turbo' is invalid: expected one of 'pil'"):
        DataConfig(decoder="turbo")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="data.decoder='cuda' needs a CUDA device"):
            build_train_loader(DataConfig(train_urls=shards, decoder="cuda"), img_size=24, micro_batch=8)


def test_crop_resize_is_pillows_bilinear_inside_the_border():
    """The training resize (torch's antialiased uint8 bilinear) gives Pillow's pixels up to
    rounding, away from the crop's border (where Pillow's filter also reads outside the box)."""
    from t2t_dist.data.transforms import _crop_resize

    with Image.open(io.BytesIO(_images()["500x375"])) as image:
        pixels = np.asarray(image.convert("RGB"))
    for box, size in [((0, 0, 500, 375), 224), ((37, 20, 337, 245), 224), ((100, 50, 180, 110), 64),
                      ((10, 10, 400, 300), 16)]:
        reference = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR, box=box))
        got = _crop_resize(pixels, box, size, flip=False)
        inside = np.abs(reference.astype(int) - got.astype(int))[2:-2, 2:-2]
        assert got.shape == (size, size, 3) and inside.max() <= 2, (box, inside.max())
        flipped = _crop_resize(pixels, box, size, flip=True)
        np.testing.assert_array_equal(flipped, got[:, ::-1])
