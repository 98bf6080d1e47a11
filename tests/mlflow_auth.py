"""A real ``mlflow server --app-name basic-auth`` on 127.0.0.1 as cluster/k8s/mlflow.yaml runs
it (SQLite standing in for PostgreSQL), and the Job script that manages its training user:
shared by the cluster tests and the job's credential tests."""

from __future__ import annotations

import base64
import configparser
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "cluster" / "k8s" / "mlflow.yaml"
SCRIPT = ROOT / "cluster" / "k8s" / "mlflow_user.py"
ADMIN, ADMIN_PASSWORD = "admin", "t2t-test-admin-password-4e1f"
TRAINING, TRAINING_PASSWORD = "t2t-training", "t2t-test-training-password-9c3a"
SECRET_KEY = "t2t-test-flask-secret-key-77d0"
PASSWORDS = (ADMIN_PASSWORD, TRAINING_PASSWORD, SECRET_KEY)


def manifest(kind: str, name: str) -> dict:
    return next(doc for doc in yaml.safe_load_all(MANIFEST.read_text())
                if doc and doc["kind"] == kind and doc["metadata"]["name"] == name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def basic_auth_server(folder: Path):
    """The manifest's `mlflow server` on 127.0.0.1: its args (host, port, artifact destination
    made local), its basic_auth.ini (database_uri made SQLite), the environment the pod gets."""
    port = free_port()
    ini = configparser.ConfigParser()
    ini.read_string(manifest("ConfigMap", "mlflow-auth")["data"]["basic_auth.ini"])
    assert ini["mlflow"]["database_uri"].startswith("postgresql+psycopg2://")
    ini["mlflow"]["database_uri"] = f"sqlite:///{folder}/auth.db"
    with open(folder / "basic_auth.ini", "w") as file:
        ini.write(file)
    container = manifest("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = []
    for arg in container["args"]:
        option = arg.split("=")[0]
        args.append({"--host": "--host=127.0.0.1", "--port": f"--port={port}",
                     "--artifacts-destination": f"--artifacts-destination={folder}/artifacts",
                     "--allowed-hosts": f"--allowed-hosts=127.0.0.1:{port},localhost:{port}"
                     }.get(option, arg))
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update({variable["name"]: variable["value"] for variable in container["env"]
                if "value" in variable})  # the pod's own settings (no telemetry, no job runner)
    env.update(MLFLOW_BACKEND_STORE_URI=f"sqlite:///{folder}/mlflow.db",
               MLFLOW_AUTH_CONFIG_PATH=str(folder / "basic_auth.ini"),
               MLFLOW_AUTH_ADMIN_USERNAME=ADMIN, MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
               MLFLOW_FLASK_SERVER_SECRET_KEY=SECRET_KEY, HOME=str(folder), TMPDIR=str(folder))
    log = open(folder / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *args, "--workers=1"],
                               env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder,
                               start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5):
                break
        except (urllib.error.URLError, OSError):
            assert process.poll() is None, (folder / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server not up in 120 s"
            time.sleep(0.5)
    yield {"uri": uri, "pid": process.pid, "folder": folder}
    os.killpg(process.pid, signal.SIGTERM)  # our own server's process group only
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    log.close()


def status_of(uri: str, path: str, method: str = "GET", auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(uri + path, method=method,
                                     data=b'{"max_results": 1}' if method == "POST" else None,
                                     headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization",
                           "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def run_script(uri: str, admin: str, admin_password: str, user: str = TRAINING,
               password: str = TRAINING_PASSWORD) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_TRACKING_USERNAME=admin,
               MLFLOW_TRACKING_PASSWORD=admin_password, T2T_MLFLOW_USERNAME=user,
               T2T_MLFLOW_PASSWORD=password, T2T_MLFLOW_WAIT_S="30")
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=120)


def no_password_in(text: str) -> bool:
    return not any(password in text for password in PASSWORDS)
