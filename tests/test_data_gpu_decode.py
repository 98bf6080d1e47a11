"""data.decoder="cuda": nvJPEG on the GPU gives the CPU path's batches (same samples, order,
crops, flips and resume position), with pixels that differ only by what the decoders are
documented to do differently. Skipped without CUDA and torchvision; the same checks run on the
CPU with libjpeg-turbo standing in for nvJPEG in ``test_data_batch_resize.py``, whose docstring
has the measurements behind the bounds.

The bounds: nvJPEG's default chroma upsampling (torchvision opens it with
``NVJPEG_FLAGS_DEFAULT``) is nearest-neighbour, libjpeg-turbo's (Pillow's) is "fancy"
(triangle). On 4:4:4 JPEGs, which have no chroma to upsample, only the IDCT, the color
conversion and the resize's rounding remain: each image within ``IDCT_IMAGE_MEAN`` of the CPU
path, where a wrong crop, flip or sample would be tens of levels off on these noise images. On
4:2:0 JPEGs the upsampling moves noise images by ~7 levels (``CHROMA_420_BATCH_MEAN`` bounds a
batch); each image stays within ``IDCT_IMAGE_MEAN`` of the CPU decode with libjpeg-turbo's
nearest-neighbour upsampling, which checks that this is the whole difference.
"""

from __future__ import annotations

import pytest
import torch
from test_data_batch_resize import (CHROMA_420_BATCH_MEAN, IDCT_IMAGE_MEAN, gpu_test_shards,
                                    image_means, loader_builds, use_standin_decoder)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(params=["444", "420"])
def shards(request, image_tree, tmp_path):
    pytest.importorskip("torchvision.io")
    return request.param, gpu_test_shards(image_tree, tmp_path, request.param)


def test_gpu_decoder_gives_the_cpu_batches(shards, monkeypatch):
    subsampling, urls = shards
    for which in range(2):  # train, eval
        cpu = [batch for batch in loader_builds(urls, "pil")[which]()]
        gpu = [batch for batch in loader_builds(urls, "cuda")[which]()]
        with monkeypatch.context() as patch:  # nvJPEG's chroma upsampling, on the CPU
            use_standin_decoder(patch, nearest_chroma=True)
            nearest = [batch for batch in loader_builds(urls, "cuda")[which]()]
        assert len(cpu) == len(gpu) == len(nearest) > 0
        for (images, labels), (images_gpu, labels_gpu), (images_nearest, _) in zip(cpu, gpu, nearest):
            assert images_gpu.is_cuda and images_gpu.dtype == torch.uint8
            assert images_gpu.shape == images.shape and torch.equal(labels, labels_gpu.cpu())
            to_cpu_path = image_means(images_gpu, images)
            to_nearest = image_means(images_gpu, images_nearest)
            assert to_nearest.max() < IDCT_IMAGE_MEAN, ("another IDCT only", to_nearest)
            if subsampling == "444":
                assert to_cpu_path.max() < IDCT_IMAGE_MEAN, ("another IDCT only", to_cpu_path)
            else:
                assert to_cpu_path.mean() < CHROMA_420_BATCH_MEAN, ("nearest chroma", to_cpu_path)


def test_gpu_decoder_resumes_at_the_same_position(shards):
    train = loader_builds(shards[1], "cuda")[0]
    full = train()
    full.set_epoch(1)
    labels_full = [labels.tolist() for _, labels in full]
    head = train()
    head.set_epoch(1)
    for step, _ in enumerate(head):
        if step == 2:
            break
    tail = train()
    tail.load_state_dict(head.state_dict())
    tail.set_epoch(1)
    assert [labels.tolist() for _, labels in tail] == labels_full[3:]
