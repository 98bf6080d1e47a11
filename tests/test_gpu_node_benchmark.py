"""benchmarks/gpu_node.py, the one GPU benchmark command, runs every row end to end: here at
toy size on the CPU (--quick), so the command a GPU owner types does not rot between GPU runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_row_runs_at_toy_size():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_node.py"), "--device", "cpu",
                           "--quick", "--zero-stages", "0", "2"],
                          capture_output=True, text=True, timeout=300,
                          env={"DS_ACCELERATOR": "cpu", "PATH": str(Path(sys.executable).parent),
                               **({"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]}  # conftest's
                                  if "OMP_NUM_THREADS" in os.environ else {})})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    labels = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert labels == ["model alone (plain AMP step)", "ours (sdpa), uncompiled",
                      "attention=eager, uncompiled", "engine step", "plain step", "engine ZeRO-0",
                      "engine ZeRO-2", "input", "BatchAugment alone (default recipe)",
                      "loader alone, simplejpeg", "end to end, engine ZeRO-0, simplejpeg"]
    for row in rows:
        value = row.strip("| ").split(" | ")[1]
        if value[0].isdigit():
            assert float(value.replace(",", "")) > 0, row
    assert "GPU-hours" in done.stdout
