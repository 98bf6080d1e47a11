"""Pattern separators, the shard-existence check a launcher runs before taking resources, and
the read path's imports (no writer code in loader processes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from t2t_dist.data import (check_shards_exist, manifest_pattern, map_local_parts, split_patterns,
                           write_shards)


def test_split_patterns_and_map_local_parts():
    pattern = "a/x-{0..1}.tar::s3://b/y-*.tar \n file:///c/z.tar\t::d/w.tar"
    assert split_patterns(pattern) == ["a/x-{0..1}.tar", "s3://b/y-*.tar", "file:///c/z.tar",
                                       "d/w.tar"]
    assert split_patterns("  ") == []
    # Local paths go through fn; URLs and the separators stay exactly as they were.
    assert map_local_parts(pattern, lambda part: "/root/" + part) == (
        "/root/a/x-{0..1}.tar::s3://b/y-*.tar \n file:///c/z.tar\t::/root/d/w.tar")
    assert map_local_parts("", str.upper) == ""


def test_check_shards_exist(image_tree, tmp_path):
    dest = tmp_path / "out"
    manifest = write_shards(image_tree(9, classes=3), dest, prefix="t", samples_per_shard=4,
                            processes=1)
    pattern = manifest_pattern(str(dest), manifest)
    table = check_shards_exist(pattern)
    assert table.num_samples == 9 and table.classes == ("c0000", "c0001", "c0002")
    with pytest.raises(ValueError, match="shard pattern is empty: expected shard URLs such as"):
        check_shards_exist(" ")
    with pytest.raises(ValueError, match="matched no shards"):
        check_shards_exist(f"{dest}/nope-*.tar")
    with pytest.raises(ValueError, match="t-0007.tar is not in manifest"):
        check_shards_exist(f"{dest}/t-0007.tar")
    (dest / "t-0001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="t-0001.tar does not exist, though its manifest"):
        check_shards_exist(pattern)
    (dest / "t.manifest.json").unlink()
    with pytest.raises(FileNotFoundError) as error:
        check_shards_exist(pattern)
    assert str(error.value).endswith(f"run `t2t-dist shards check '{dest}/t-*.tar' --write-manifest`")
    assert "\n" not in str(error.value)


def test_read_path_loads_no_writer_code():
    """DataLoader processes import the loader; the writer and webdataset stay out of them."""
    code = ("import json, sys, t2t_dist.data.loader, t2t_dist.data\n"
            "t2t_dist.data.build_train_loader, t2t_dist.data.check_shards_exist\n"
            "print(json.dumps(sorted(m for m in sys.modules\n"
            "                        if m.startswith(('webdataset', 't2t_dist.data.')))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                       text=True, check=True).stdout)
    assert "t2t_dist.data.loader" in loaded and "t2t_dist.data.manifest" in loaded
    assert not [m for m in loaded if m.startswith("webdataset")
                or m in ("t2t_dist.data.writer", "t2t_dist.data.check", "t2t_dist.data.digits")]
