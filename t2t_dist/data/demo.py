"""The built-in demo data: ``digits://train`` and ``digits://val`` name scikit-learn's digits,
written as shards into a per-user cache on first use.

    resolve_demo_urls("digits://train", img_size=32)
    # -> "~/.cache/t2t-dist/digits-32px/train/digits-train-{0000..0007}.tar" (absolute)

The cache does not depend on the working directory, so the default job runs the same under
``python jobs/pretrain.py`` and ``ray job submit --working-dir .``; concurrent jobs build it
once, under a file lock. ``$T2T_DIST_CACHE`` moves it (default ``$XDG_CACHE_HOME/t2t-dist`` or
``~/.cache/t2t-dist``). The cache is node-local: on several nodes, shards belong on shared
storage or S3.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from t2t_dist.data.digits import make_digits_dataset

DEMO_SCHEME = "digits://"
SPLITS = ("train", "val")


def cache_dir() -> Path:
    """Where t2t-dist keeps built-in data: ``$T2T_DIST_CACHE``, else the user cache."""
    explicit = os.environ.get("T2T_DIST_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "t2t-dist"


def is_demo_url(url: str) -> bool:
    return url.strip().startswith(DEMO_SCHEME)


def ensure_digits_shards(img_size: int) -> dict[str, str]:
    """The digits shards at ``img_size`` in the cache, built once (under a lock) if missing;
    returns ``{"train": pattern, "val": pattern}``."""
    root = cache_dir() / f"digits-{img_size}px"
    done = root / "patterns.json"  # written last: its presence means the shards are whole
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second job waits here, then finds `done`
        if not done.is_file():
            shutil.rmtree(root, ignore_errors=True)  # what a killed build left
            patterns = make_digits_dataset(str(root), img_size=img_size)
            done.write_text(json.dumps(patterns))
        return json.loads(done.read_text())


def resolve_demo_urls(url: str, *, img_size: int) -> str:
    """``digits://train`` or ``digits://val`` -> the shard pattern of that split (built on first use)."""
    split = url.strip()[len(DEMO_SCHEME):].strip("/")
    if split not in SPLITS:
        raise ValueError(f"data URL {url!r} is invalid: expected {DEMO_SCHEME}train or "
                         f"{DEMO_SCHEME}val (the built-in digits demo data)")
    return ensure_digits_shards(img_size)[split]
