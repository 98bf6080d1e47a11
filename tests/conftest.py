"""Shared test fixtures: a real S3-compatible server (moto's server mode) on 127.0.0.1 over HTTP,
and (from ray_cluster.py) a `ray start --head` cluster and the digits demo shards.

    def test_upload(s3_bucket):          # "s3://<fresh bucket>", AWS_* set for boto3
        store = open_store(s3_bucket + "/prefix")

    def test_outage(s3_server):          # the session's server, which a test may restart
        s3_server.stop(); ...; s3_server.start()   # same port; moto keeps its state in-process
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import uuid

import pytest

from ray_cluster import digits_shards, driver, ray_cluster  # noqa: F401  (fixtures for every test module)

# Under pytest-xdist each test process, and everything it starts (jobs, Ray clusters, spawned
# ranks), gets its share of the cores for torch's OpenMP threads, as Ray gives each worker its
# CPUs. Left at every core each, the processes' threads spin waiting on each other: measured
# beside two busy processes (`python3 -c "while True: pass" &`, twice), `time OMP_NUM_THREADS=N
# .venv/bin/python benchmarks/gpu_node.py --device cpu --quick --zero-stages 0 2` took 28 s
# (19 s of CPU) with 2 threads, 13 s (7 s) with 1; alone, 8 s. Read by OpenMP when torch loads,
# which is after this.
_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _PROCESSES > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _PROCESSES)))

# The server runs in its own process, so DataLoader workers forked from the test process do
# not inherit its listening socket (which would keep the port bound across a restart).
# It is driven by lines on its stdin, read by its main thread: "stop" closes the listening
# socket (clients get "connection refused"), "start" opens it again on the same port; moto's
# state lives in that process, so buckets survive. (Signals into this multi-threaded process
# were sometimes never handled, which hung the restart test.)
_SERVER_SCRIPT = r"""
import sys, threading
from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                           create_backend_app)
from werkzeug.serving import make_server
port, app, state = int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), {}
def start():
    state["server"] = make_server("127.0.0.1", port, app, threaded=True,
                                  request_handler=MotoRequestHandler)
    state["thread"] = threading.Thread(target=state["server"].serve_forever, daemon=True)
    state["thread"].start()
    print("ready", flush=True)
def stop():
    state["server"].shutdown()
    state["server"].server_close()
    state["thread"].join()
    print("stopped", flush=True)
start()
for line in sys.stdin:  # EOF (the test process closed the pipe or died): exit
    {"start": start, "stop": stop}[line.strip()]()
"""
SERVER_DEADLINE_S = 30.0


class S3Server:
    """moto's S3 app in a subprocess we control: ``stop()``/``start()`` keep port and data."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._process = subprocess.Popen([sys.executable, "-c", _SERVER_SCRIPT, str(self.port)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._expect("ready")

    def _expect(self, word: str) -> None:
        """Wait (at most SERVER_DEADLINE_S) for the server's next line, which must be ``word``."""
        ready, _, _ = select.select([self._process.stdout], [], [], SERVER_DEADLINE_S)
        if not ready:
            raise RuntimeError(f"moto server did not say {word!r} within {SERVER_DEADLINE_S:.0f} s")
        line = self._process.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"moto server said {line!r} (exit code {self._process.poll()}), "
                               f"expected {word!r}")

    def _command(self, word: str, reply: str) -> None:
        self._process.stdin.write(word + "\n")
        self._process.stdin.flush()
        self._expect(reply)

    def stop(self) -> None:
        """Close the listening socket: new connections are refused until ``start()``."""
        self._command("stop", "stopped")

    def start(self) -> None:
        self._command("start", "ready")

    def close(self) -> None:
        self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)


@pytest.fixture(scope="session", autouse=True)
def private_demo_cache(tmp_path_factory):
    """Built-in ``digits://`` data goes to a folder of this session, never to ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("T2T_DIST_CACHE", str(tmp_path_factory.mktemp("t2t-dist-cache")))
        yield


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session; AWS_* point boto3 at it."""
    pytest.importorskip("moto.server")
    server = S3Server()
    env = {"AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as patch:  # session-scoped: restored at the end
        for name, value in env.items():
            patch.setenv(name, value)
        yield server
    server.close()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session's server: ``s3://<name>``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def process_group():
    """A one-rank gloo group, as Ray Train would have set up (DeepSpeed on CPU). One per session:
    DeepSpeed caches the first group it sees (a second group would be "not registered")."""
    import torch.distributed as torch_dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        torch_dist.init_process_group("gloo", rank=0, world_size=1)
        yield
        torch_dist.destroy_process_group()


def _write_image_tree(root, num_samples: int, *, side: int = 24, classes: int | None = None):
    """An ImageFolder tree of small JPEGs; with ``classes=None`` every sample is its own class,
    so a label names the sample (how the loader tests check exactly-once)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(num_samples):
        label = index if classes is None else index % classes
        folder = root / f"c{label:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (side, side + 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index:04d}.jpg", quality=90)
    return root


@pytest.fixture
def image_tree(tmp_path):
    """``image_tree(num_samples, side=24, classes=None)`` -> path of a fresh ImageFolder tree."""
    counter = iter(range(1000))
    return lambda num_samples, **kw: _write_image_tree(tmp_path / f"tree{next(counter)}",
                                                       num_samples, **kw)


def overwrite_member(data: bytes, member: str, payload_fn) -> bytes:
    """Tar bytes with one member's payload replaced by ``payload_fn(old)`` of the same length
    (so the manifest's offsets stay right): how tests make corrupt or unlabeled samples."""
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmember(member)
        old = data[info.offset_data:info.offset_data + info.size]
    new = payload_fn(old)
    assert len(new) == len(old)
    return data[:info.offset_data] + new + data[info.offset_data + info.size:]


@pytest.fixture
def patch_member():
    return overwrite_member


def pytest_collection_modifyitems(items):
    """Modules that start Ray jobs first, the most first; then the slow ones. `make test` hands
    whole modules to its two processes (``--dist loadfile``: a module's fixtures are built
    once) in this order, so the long modules do not all start last."""
    weight: dict[str, tuple[int, int]] = {}
    for item in items:
        ray, slow = weight.get(item.module.__name__, (0, 0))
        weight[item.module.__name__] = (ray - bool(item.get_closest_marker("ray")),
                                        slow - bool(item.get_closest_marker("slow")))
    items.sort(key=lambda item: weight[item.module.__name__])  # stable: a module stays in order


_EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's teardown once pytest has reported everything. The C++
    parts this process loaded (gloo's process group, DeepSpeed's CPU comm op, Ray's core
    worker) sometimes crash in their exit-time destructors: a fresh-clone CI run printed
    "571 passed" and then make reported a segmentation fault, failing a run whose tests had all
    passed. Spawned ranks in test_elastic leave the same way. Only when pytest is the program
    (``pytest``, ``python -m pytest``), not when a tool (mutmut) calls ``pytest.main``."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    is_program = (getattr(main_spec, "name", "") in ("pytest", "pytest.__main__")
                  or os.path.basename(sys.argv[0]) in ("pytest", "py.test"))
    if is_program and _EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT_STATUS])

