"""data.decoder="cuda": nvJPEG on the GPU gives the CPU path's batches (same samples, order,
crops and resume position; pixels close). Skipped without CUDA and torchvision."""

from __future__ import annotations

import pytest
import torch

from t2t_dist.config import DataConfig
from t2t_dist.data import build_train_loader, build_val_loader, manifest_pattern, write_shards

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def shards(image_tree, tmp_path):
    pytest.importorskip("torchvision.io")
    manifest = write_shards(image_tree(48, side=40), tmp_path / "out", prefix="gpu", samples_per_shard=10,
                            processes=1)
    return manifest_pattern(str(tmp_path / "out"), manifest)


def _config(shards, decoder):
    return DataConfig(train_urls=shards, val_urls=shards, loader_workers=2, shard_interleave=3,
                      eval_batch=7, decoder=decoder)


def test_gpu_decoder_gives_the_cpu_batches(shards):
    for build in (lambda c: build_train_loader(c, img_size=24, micro_batch=8),
                  lambda c: build_val_loader(c, img_size=24)):
        cpu = [(images, labels) for images, labels in build(_config(shards, "pil"))]
        gpu = [(images, labels) for images, labels in build(_config(shards, "cuda"))]
        assert len(cpu) == len(gpu) > 0
        for (images, labels), (images_gpu, labels_gpu) in zip(cpu, gpu):
            assert images_gpu.is_cuda and images_gpu.dtype == torch.uint8
            assert images_gpu.shape == images.shape and torch.equal(labels, labels_gpu)
            difference = (images_gpu.cpu().float() - images.float()).abs()
            assert difference.mean() < 4, "another resize, the same crop: close pixels"


def test_gpu_decoder_resumes_at_the_same_position(shards):
    full = build_train_loader(_config(shards, "cuda"), img_size=24, micro_batch=8)
    full.set_epoch(1)
    labels_full = [labels.tolist() for _, labels in full]
    head = build_train_loader(_config(shards, "cuda"), img_size=24, micro_batch=8)
    head.set_epoch(1)
    for step, _ in enumerate(head):
        if step == 2:
            break
    tail = build_train_loader(_config(shards, "cuda"), img_size=24, micro_batch=8)
    tail.load_state_dict(head.state_dict())
    tail.set_epoch(1)
    assert [labels.tolist() for _, labels in tail] == labels_full[3:]
