"""The pure parts of cluster/slurm/ray_on_slurm.py (no Slurm needed; tests/test_slurm.py
runs the whole launcher on a real Slurm)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster" / "slurm"))
import ray_on_slurm  # noqa: E402  (cluster/slurm/ray_on_slurm.py)


@pytest.mark.parametrize("value, expected", [
    ("2", [2]), ("72(x2),36", [72, 72, 36]), ("8(x3)", [8, 8, 8]), ("4,4", [4, 4])])
def test_slurm_count_lists_expand_per_node(value, expected):
    assert ray_on_slurm.expand_counts(value) == expected


def test_bad_count_list_is_one_line_error():
    with pytest.raises(ValueError, match=r"cannot read Slurm count list '72\(2\)': expected"):
        ray_on_slurm.expand_counts("72(2)")


@pytest.mark.parametrize("env, gpus", [
    ({}, 0), ({"SLURM_GPUS_ON_NODE": "4"}, 4), ({"SLURM_GPUS_PER_NODE": "h100:8"}, 8),
    ({"SLURM_GPUS_PER_NODE": "2"}, 2), ({"SLURM_GPUS_ON_NODE": "1", "SLURM_GPUS_PER_NODE": "8"}, 1)])
def test_gpus_per_node_from_slurm(env, gpus):
    assert ray_on_slurm.gpus_per_node(env) == gpus


@pytest.mark.parametrize("argv, job", [
    ([], ["jobs/pretrain.py"]),
    (["--config", "c.yaml"], ["jobs/pretrain.py", "--config", "c.yaml"]),
    (["jobs/sweep.py", "--set", "a.b=1"], ["jobs/sweep.py", "--set", "a.b=1"]),
    (["--port-base", "42000", "--", "jobs/pretrain.py"], ["jobs/pretrain.py"]),
])
def test_job_defaults_to_pretraining(argv, job, monkeypatch):
    monkeypatch.delenv("T2T_RAY_PORT_BASE", raising=False)
    assert ray_on_slurm.parse_args(argv)[1] == job


def test_explicit_ports_are_distinct_and_in_range():
    head = ray_on_slurm.ray_port_args(42000, head=True)
    worker = ray_on_slurm.ray_port_args(42000, head=False)
    ports = [int(arg.split("=")[1]) for arg in head]
    assert len(set(ports)) == len(ports) and all(42000 <= p <= 42999 for p in ports)
    assert "--port=42000" in head and not any(a.startswith("--port=") for a in worker)
    assert ray_on_slurm.ray_port_args(0, head=True) == []  # Ray's defaults on whole nodes


def test_outside_slurm_is_one_line_error(monkeypatch, capsys):
    for name in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_JOB_CPUS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert ray_on_slurm.main([]) == 2
    assert "not set: run this inside a Slurm job" in capsys.readouterr().err
