"""The Ray auth token checks of cluster/slurm/ray_on_slurm.py: the job refuses to start (one
line, exit 2, nothing started) when the token is missing, empty or readable by others, creates
~/.ray/auth_token 0600, and never prints the token. No Slurm needed."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster" / "slurm"))
import ray_on_slurm  # noqa: E402  (cluster/slurm/ray_on_slurm.py)

TOKEN = "f3" * 32  # what a token looks like: 64 hex digits


def token_file(tmp_path: Path, mode: int, text: str = TOKEN) -> Path:
    path = tmp_path / ".ray" / "auth_token"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_missing_default_token_is_created_private(tmp_path):
    source = ray_on_slurm.ensure_auth_token({"RAY_AUTH_MODE": "token"}, home=tmp_path)
    path = tmp_path / ".ray" / "auth_token"
    assert source == f"token from {path}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = path.read_text()
    assert len(token) == 64 and int(token, 16)
    assert list(path.parent.iterdir()) == [path]  # no partial file left behind
    # The next job (and a requeued one) reuses it.
    ray_on_slurm.ensure_auth_token({"RAY_AUTH_MODE": "token"}, home=tmp_path)
    assert path.read_text() == token


def test_existing_private_token_is_used(tmp_path):
    path = token_file(tmp_path, 0o600)
    assert ray_on_slurm.ensure_auth_token({"RAY_AUTH_MODE": "token"}, home=tmp_path) \
        == f"token from {path}"
    assert path.read_text() == TOKEN
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}
    assert ray_on_slurm.ensure_auth_token(env, home=tmp_path / "elsewhere") == f"token from {path}"
    assert ray_on_slurm.ensure_auth_token({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}) \
        == "token from RAY_AUTH_TOKEN"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_token_open_to_group_or_others_is_refused(tmp_path, mode):
    path = token_file(tmp_path, mode)
    with pytest.raises(ray_on_slurm.TokenError) as refused:
        ray_on_slurm.ensure_auth_token({"RAY_AUTH_MODE": "token"}, home=tmp_path)
    message = str(refused.value)
    assert f"mode {mode:04o}" in message and f"chmod 600 {path}" in message
    assert "\n" not in message and TOKEN not in message
    assert path.read_text() == TOKEN  # left for its owner to fix, not rewritten


@pytest.mark.parametrize("env, match", [
    ({"RAY_AUTH_TOKEN": ""}, "RAY_AUTH_TOKEN is set but empty"),
    ({"RAY_AUTH_TOKEN": "  "}, "RAY_AUTH_TOKEN is set but empty"),
    ({"RAY_AUTH_TOKEN_PATH": "{tmp}/nowhere"}, "RAY_AUTH_TOKEN_PATH=.*/nowhere does not exist"),
])
def test_missing_or_empty_token_is_refused(tmp_path, env, match):
    env = {key: value.format(tmp=tmp_path) for key, value in env.items()}
    with pytest.raises(ray_on_slurm.TokenError, match=match):
        ray_on_slurm.ensure_auth_token({"RAY_AUTH_MODE": "token", **env}, home=tmp_path)
    assert not (tmp_path / ".ray").exists()  # an explicit token is never made up


def test_empty_token_file_is_refused(tmp_path):
    token_file(tmp_path, 0o600, text="\n")
    with pytest.raises(ray_on_slurm.TokenError, match="is empty"):
        ray_on_slurm.ensure_auth_token({"RAY_AUTH_MODE": "token"}, home=tmp_path)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the file to another uid")
def test_token_of_another_user_is_refused(tmp_path):
    path = token_file(tmp_path, 0o600)
    os.chown(path, 65534, -1)
    with pytest.raises(ray_on_slurm.TokenError, match="belongs to uid 65534, not to you"):
        ray_on_slurm.ensure_auth_token({"RAY_AUTH_MODE": "token"}, home=tmp_path)


def test_dashboard_on_every_interface_only_with_token_auth():
    assert ray_on_slurm.dashboard_host({"RAY_AUTH_MODE": "token"}) == "0.0.0.0"
    assert ray_on_slurm.dashboard_host({"RAY_AUTH_MODE": "disabled"}) == "127.0.0.1"
    assert ray_on_slurm.dashboard_host({}) == "127.0.0.1"
    assert "127.0.0.1 only" in ray_on_slurm.ensure_auth_token({"RAY_AUTH_MODE": "disabled"})


def test_job_with_readable_token_stops_before_ray_starts(tmp_path, monkeypatch, capsys):
    """main(): one line on stderr, exit 2, no `srun` step started, the token not printed."""
    token_file(tmp_path, 0o644)
    allocation = ray_on_slurm.Allocation(job_id="7", nodes=["node1"], cpus=[4], gpus=0, restarts=0)
    monkeypatch.setattr(ray_on_slurm.Allocation, "from_env", classmethod(lambda cls, env: allocation))
    started = []
    monkeypatch.setattr(ray_on_slurm, "node_step", lambda *args: started.append(args))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert ray_on_slurm.main(["jobs/pretrain.py"]) == 2
    out, err = capsys.readouterr()
    assert started == [] and out == ""
    assert err.count("\n") == 1 and err.startswith("ray_on_slurm: error: the Ray token file")
    assert TOKEN not in err


def test_sbatch_scripts_turn_token_auth_on():
    for script in ("ray.sbatch", "ray-shared.sbatch"):
        text = (Path(ray_on_slurm.__file__).parent / script).read_text()
        assert 'export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"' in text
        assert "RAY_AUTH_TOKEN=" not in text  # never a token on the script's lines
