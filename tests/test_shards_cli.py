"""`t2t-dist shards write` / `shards check` run as a user types them (the console script in a
subprocess): bad source files are skipped and reported, damaged shards give a report and not
a traceback, and long runs show progress."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import tarfile
import termios
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2t_dist.data import write_shards
from t2t_dist.data.manifest import load_shard_table
from t2t_dist.data.tar import parse_tar_samples

_SCRIPT = Path(sys.executable).parent / "t2t-dist"
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "t2t_dist.cli"]
PROGRESS_LINE = re.compile(r"^shards (write|check): \d+/\d+ images \(\d+%\), [\d.]+ img/s, "
                           r"elapsed \S+(, ETA \S+)?$", re.MULTILINE)

pytestmark = pytest.mark.slow


def t2t_dist(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def _pixels(rng, channels: int = 3) -> np.ndarray:
    return rng.integers(0, 255, (24, 32, channels), dtype=np.uint8)


def _damaged_tree(root: Path, num_good: int = 20) -> tuple[dict[str, int], dict[str, str]]:
    """An ImageFolder tree of 3 classes as real ImageNet trees come: good JPEGs, a CMYK JPEG and a
    PNG named .jpg (both good), a truncated JPEG, an empty file and a text file named .jpg.
    Returns {good file name: label} and {bad path relative to root: expected reason}."""
    rng = np.random.default_rng(0)
    good = {}
    for index in range(num_good):
        folder = root / f"c{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pixels(rng)).save(folder / f"img{index:03d}.jpg", quality=90)
        good[f"img{index:03d}.jpg"] = index % 3
    Image.fromarray(_pixels(rng, 4), "CMYK").save(root / "c1" / "cmyk.jpg", quality=90)
    Image.fromarray(_pixels(rng)).save(root / "c2" / "png.jpg", format="PNG")
    good.update({"cmyk.jpg": 1, "png.jpg": 2})
    whole = (root / "c0" / "img000.jpg").read_bytes()
    (root / "c0" / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    (root / "c1" / "empty.jpg").write_bytes(b"")
    (root / "c2" / "notes.jpg").write_text("not an image\n")
    bad = {"c0/truncated.jpg": "OSError", "c1/empty.jpg": "empty file",
           "c2/notes.jpg": "not an image"}
    return good, bad


def _read_back(out: Path, prefix: str) -> list[tuple[str, int, bytes]]:
    """(source file name, label, jpg bytes) of every sample, read as the loader reads: one byte
    range per sample from the manifest's offsets."""
    table = load_shard_table(f"{out}/{prefix}-*.tar")
    samples = []
    for url, offsets in zip(table.urls, table.offsets):
        data = Path(url).read_bytes()
        for start, end in zip(offsets[:-1], offsets[1:]):
            (fields,) = parse_tar_samples(data[start:end])
            label = int(fields["cls"])
            assert json.loads(fields["json"])["label"] == label
            samples.append((json.loads(fields["json"])["file"], label, fields["jpg"]))
    return samples


def test_write_skips_bad_files_reports_them_and_lands_every_good_image(tmp_path):
    good, bad = _damaged_tree(tmp_path / "tree")
    out = tmp_path / "out"
    run = t2t_dist("shards", "write", tmp_path / "tree", out, "--prefix", "p",
                   "--samples-per-shard", 5, "--processes", 2, "--progress-every", 0.05)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stdout.strip() == (f"wrote 22 samples of 3 classes in 5 shards, skipped 3 bad files "
                                  f"(see {out}/p.bad-files.json): {out}/p-{{0000..0004}}.tar")
    # Non-TTY: periodic progress lines on stderr, the last one at 100%.
    assert PROGRESS_LINE.search(run.stderr)
    assert run.stderr.strip().splitlines()[-1].startswith("shards write: 25/25 images (100%)")

    report = json.loads((out / "p.bad-files.json").read_text())
    assert (report["num_files"], report["num_bad_files"]) == (25, 3)
    assert [row["path"] for row in report["bad_files"]] == sorted(bad)
    for row in report["bad_files"]:
        assert row["reason"].startswith(bad[row["path"]]) and row["class"] == row["path"][:2]

    manifest = json.loads((out / "p.manifest.json").read_text())
    assert manifest["num_samples"] == 22 and manifest["bad_files"] == 3
    assert sum(entry["samples"] for entry in manifest["shards"]) == 22
    # Bad files are skipped inside their shard (5 shards of 5 files), not repacked into 5+5+5+5+2.
    assert [entry["samples"] for entry in manifest["shards"]] != [5, 5, 5, 5, 2]

    samples = _read_back(out, "p")
    assert sorted((name, label) for name, label, _ in samples) == sorted(good.items())
    for name, _, jpg in samples:
        with Image.open(io.BytesIO(jpg)) as image:
            assert image.format == "JPEG" and image.mode == "RGB", name  # CMYK and PNG converted
            image.load()

    check = t2t_dist("shards", "check", f"{out}/p-{{0000..0004}}.tar", "--progress-every", 0.05)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "22 samples, 3 classes seen of 3 in the manifest" in check.stdout
    assert "shards check: 22/22 images (100%)" in check.stderr

    # Deterministic: the same tree and seed give the same bytes, in one process or several.
    again = tmp_path / "again"
    write_shards(tmp_path / "tree", again, prefix="p", samples_per_shard=5, processes=1)
    assert sorted(os.listdir(again)) == sorted(os.listdir(out))
    for name in os.listdir(out):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_write_strict_stops_at_the_bad_file_in_one_line_without_manifest(tmp_path, image_tree):
    src = image_tree(12, classes=3)
    whole = (src / "c0000" / "img0000.jpg").read_bytes()
    (src / "c0001" / "cut.jpg").write_bytes(whole[:len(whole) // 3])
    out = tmp_path / "out"
    run = t2t_dist("shards", "write", src, out, "--prefix", "s", "--samples-per-shard", 4,
                   "--processes", 2, "--strict", "--progress-every", 0)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert run.stderr.startswith(f"t2t-dist: error: {src}/c0001/cut.jpg is not a usable image (")
    assert not (out / "s.manifest.json").exists() and not (out / "s.bad-files.json").exists()

    # Without --strict the same tree writes, and the report names the file.
    run = t2t_dist("shards", "write", src, out, "--prefix", "s", "--samples-per-shard", 4,
                   "--processes", 1, "--progress-every", 0)
    assert run.returncode == 0, run.stderr
    assert "wrote 12 samples of 3 classes in 4 shards, skipped 1 bad files" in run.stdout
    report = json.loads((out / "s.bad-files.json").read_text())
    assert [row["path"] for row in report["bad_files"]] == ["c0001/cut.jpg"]


def test_write_all_bad_is_one_line_error(tmp_path):
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "tree" / "a" / "x.jpg").write_bytes(b"")
    run = t2t_dist("shards", "write", tmp_path / "tree", tmp_path / "out", "--prefix", "e",
                   "--progress-every", 0)
    assert run.returncode == 1 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "has no usable images: all 1 files failed to decode" in run.stderr
    assert not (tmp_path / "out" / "e.manifest.json").exists()


def test_check_damaged_shards_reports_and_exits_1(tmp_path, image_tree, patch_member):
    out = tmp_path / "out"
    write_shards(image_tree(24, classes=4), out, prefix="d", samples_per_shard=4, processes=1)
    first = out / "d-0000.tar"  # a corrupt image member
    jpg = next(name for name in tarfile.open(first).getnames() if name.endswith(".jpg"))
    first.write_bytes(patch_member(first.read_bytes(), jpg, lambda old: b"\xff" * len(old)))
    cut = out / "d-0001.tar"  # truncated mid-member
    cut.write_bytes(cut.read_bytes()[:2000])
    (out / "d-0002.tar").unlink()  # missing
    (out / "d-0003.tar").write_bytes(os.urandom(4096))  # not a tar at all
    (out / "d-0004.tar").write_bytes(b"")  # empty
    run = t2t_dist("shards", "check", f"{out}/d-{{0000..0005}}.tar", "--progress-every", 0.01)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr and "error" not in run.stderr
    rows = {line.split()[0].rpartition("/")[2]: line for line in run.stdout.splitlines()[1:-1]}
    assert rows["d-0000.tar"].split()[1:4] == ["4", "1", "0"]  # 4 samples, 1 corrupt
    assert "truncated" in rows["d-0001.tar"]
    assert rows["d-0002.tar"].rstrip().endswith("missing")
    assert rows["d-0003.tar"].split()[4:] and rows["d-0004.tar"].split()[4:]  # a problem each
    assert rows["d-0005.tar"].split()[1:] == ["4", "0", "0"]
    assert run.stdout.splitlines()[-1].endswith("1 corrupt, 0 unlabeled, 4 bad shards -> PROBLEMS")
    assert PROGRESS_LINE.search(run.stderr)


def test_progress_bar_on_a_terminal(tmp_path, image_tree):
    """stderr on a TTY: a tqdm bar with images/s (and ETA while running), not log lines."""
    src = image_tree(6, classes=2)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # rows, columns
    process = subprocess.Popen([*CLI, "shards", "write", str(src), str(tmp_path / "out"),
                                "--processes", "1", "--samples-per-shard", "3"],
                               stdout=subprocess.PIPE, stderr=terminal, text=True)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert process.wait(timeout=240) == 0
    shown = b"".join(chunks).decode()
    assert "shards write: 100%" in shown and "6/6" in shown and "img/s" in shown
    assert not PROGRESS_LINE.search(shown.replace("\r", "\n"))
    assert process.stdout.read().startswith("wrote 6 samples of 2 classes in 2 shards, skipped 0")
