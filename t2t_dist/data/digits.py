"""Demo data: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as shards.

The data ships inside scikit-learn (no download). Each 8x8 image (0..16) becomes an
upscaled RGB JPEG in an ImageFolder tree with a fixed, stratified train/val split, and the
tree goes through the same ``write_shards`` as ImageNet.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from t2t_dist.data.manifest import manifest_pattern
from t2t_dist.data.writer import write_shards
from t2t_dist.storage import is_s3


def write_digits_folders(root: str | Path, *, img_size: int = 64, val_fraction: float = 1 / 6,
                         seed: int = 0) -> dict[str, Path]:
    """``root/{train,val}/<digit>/<index>.jpg``; the split is stratified and fixed by ``seed``."""
    from sklearn.datasets import load_digits  # ~1 s; only when the demo data is first built

    digits = load_digits()
    rng = np.random.default_rng(seed)
    root = Path(root)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        num_val = int(round(len(indices) * val_fraction))
        for split, chosen in (("val", indices[:num_val]), ("train", indices[num_val:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for index in chosen:
                pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)  # (8, 8)
                image = Image.fromarray(pixels, "L").resize((img_size, img_size), Image.BICUBIC)
                image.convert("RGB").save(folder / f"digit_{index:04d}.jpg", quality=95)
    return {"train": root / "train", "val": root / "val"}


def make_digits_dataset(dest_dir: str, *, img_size: int = 64, samples_per_shard: int = 200,
                        val_fraction: float = 1 / 6, seed: int = 0,
                        processes: int = 1) -> dict[str, str]:
    """Digits as shards under ``dest_dir`` (a folder or s3:// URL); returns the shard patterns.

    ``{"train": "<dest>/train/digits-train-{0000..0007}.tar", "val": "<dest>/val/digits-val-..."}``
    (1,500 train and 297 val samples with the defaults; the last shard of each is shorter).
    """
    dest_dir = str(dest_dir).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="digits-") as scratch:
        # A local destination keeps the JPEG tree (benchmarks decode it); S3 gets shards only.
        tree = Path(scratch) if is_s3(dest_dir) else Path(dest_dir) / "images"
        folders = write_digits_folders(tree, img_size=img_size, val_fraction=val_fraction, seed=seed)
        patterns = {}
        for split, folder in folders.items():
            dest = f"{dest_dir}/{split}"
            manifest = write_shards(folder, dest, prefix=f"digits-{split}",
                                    samples_per_shard=samples_per_shard, processes=processes,
                                    shuffle_seed=seed)
            patterns[split] = manifest_pattern(dest, manifest)
    return patterns
