"""The package's data flow runs one way (STYLE.md): a module imports only from layers to its left."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "t2t_dist"
LAYERS = ["config", "data", "models", "optim", "engine", "checkpoint", "loop", "tracking",
          "export", "launch", "cli"]
LEAVES = {"dist", "storage", "__init__"}  # importable from anywhere; they import only config
FORBIDDEN_IN_MODELS = ("deepspeed", "ray", "mlflow", "boto3", "botocore")


def _room(module: str) -> str:
    """t2t_dist.data.loader -> data; t2t_dist.launch.build -> launch."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_left(path):
    module = "t2t_dist." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    room = _room(module)
    if room == "__init__":
        return
    for name in _imports(path):
        if not name.startswith("t2t_dist."):
            continue
        target = _room(name)
        if target == room:
            continue
        if room in LEAVES:
            assert target == "config", f"leaf {module} imports {name}: leaves import only config"
            continue
        if target in LEAVES:
            continue
        assert room in LAYERS, f"{module}: room {room!r} is not in the layer list {LAYERS}"
        assert LAYERS.index(target) < LAYERS.index(room), (
            f"{module} ({room}) imports {name} ({target}): imports must flow left along {LAYERS}")


# Inside launch/, the same one-way flow: each room imports only rooms to its left. Checks and
# stopping first, the worker side next, the driver, then what drives it (jobs' shared parts).
LAUNCH_ROOMS = ["console", "preflight", "stop", "sweep", "figure", "report", "build",
                "train_worker", "driver", "evaluation", "tune", "job"]


@pytest.mark.parametrize("path", sorted((PACKAGE / "launch").glob("*.py")), ids=lambda p: p.name)
def test_launch_rooms_flow_left(path):
    if path.stem == "__init__":
        return
    assert path.stem in LAUNCH_ROOMS, f"launch/{path.name} is not in LAUNCH_ROOMS: place it"
    for name in _imports(path):
        if name.startswith("t2t_dist.launch."):
            target = name.split(".")[2]
            assert LAUNCH_ROOMS.index(target) < LAUNCH_ROOMS.index(path.stem), (
                f"launch/{path.name} imports {name}: launch rooms import only those left of "
                f"them in {LAUNCH_ROOMS}")


RAY_ROOTS = ("ray",)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_launch_imports_ray(path):
    """Everything that imports Ray lives under t2t_dist/launch/."""
    if path.relative_to(PACKAGE).parts[0] == "launch":
        return
    for name in _imports(path):
        assert name.split(".")[0] not in RAY_ROOTS, f"{path.name} imports {name}: only launch/ may"


def test_read_path_imports_no_writer():
    """The loader and its stream never import the shard writer (or anything that does)."""
    import subprocess
    import sys

    code = ("import sys, t2t_dist.data.loader; "
            "print(sorted(m for m in sys.modules if m.startswith('t2t_dist.data.')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert "writer" not in loaded and "check" not in loaded, loaded


def test_model_code_is_single_device_pytorch():
    for path in (PACKAGE / "models").rglob("*.py"):
        for name in _imports(path):
            assert not name.split(".")[0] in FORBIDDEN_IN_MODELS, f"{path.name} imports {name}"
