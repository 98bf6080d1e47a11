"""Rank facts work without a process group (single process, tests, the driver)."""

import torch

from t2t_dist import dist


def test_no_process_group_is_rank_zero_of_one(monkeypatch):
    monkeypatch.setattr(dist, "_initialized", lambda: False)  # other tests may hold a group
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (0, 1, True)
    values = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum(values).tolist() == [1.0, 2.0]


def test_launcher_environment_is_read_before_the_group_exists(monkeypatch):
    monkeypatch.setattr(dist, "_initialized", lambda: False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert (dist.rank(), dist.world_size(), dist.is_main()) == (3, 8, False)
