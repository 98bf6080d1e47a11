"""The MLflow side of cluster/k8s/mlflow.yaml against a real ``mlflow server --app-name
basic-auth`` on 127.0.0.1: the manifest's arguments and auth settings (basic_auth.ini from its
ConfigMap), with SQLite standing in for PostgreSQL, and the Job's script
cluster/k8s/mlflow_user.py managing the training user.

Anonymous calls get 401; the script creates the training user (not an admin) and, run again,
updates it; the training user logs runs, artifacts (through the server's proxy) and models,
and cannot manage users; wrong credentials stop the script in one line; no password appears
on a command line or in any output. The job side (t2t-dist commands with these credentials)
is tested with the library.
"""

from __future__ import annotations

import configparser
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (Flask-WTF)")

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "cluster" / "k8s" / "mlflow.yaml"
SCRIPT = ROOT / "cluster" / "k8s" / "mlflow_user.py"
ADMIN, ADMIN_PASSWORD = "admin", "t2t-test-admin-password-4e1f"
TRAINING, TRAINING_PASSWORD = "t2t-training", "t2t-test-training-password-9c3a"
SECRET_KEY = "t2t-test-flask-secret-key-77d0"
PASSWORDS = (ADMIN_PASSWORD, TRAINING_PASSWORD, SECRET_KEY)

pytestmark = pytest.mark.slow


def manifest(kind: str, name: str) -> dict:
    return next(doc for doc in yaml.safe_load_all(MANIFEST.read_text())
                if doc and doc["kind"] == kind and doc["metadata"]["name"] == name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The manifest's `mlflow server` on 127.0.0.1: its args (host, port, artifact destination
    made local), its basic_auth.ini (database_uri made SQLite), the environment the pod gets."""
    folder = tmp_path_factory.mktemp("mlflow-auth")
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
    env.update(MLFLOW_BACKEND_STORE_URI=f"sqlite:///{folder}/mlflow.db",
               MLFLOW_AUTH_CONFIG_PATH=str(folder / "basic_auth.ini"),
               MLFLOW_AUTH_ADMIN_USERNAME=ADMIN, MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD,
               MLFLOW_FLASK_SERVER_SECRET_KEY=SECRET_KEY, MLFLOW_DISABLE_TELEMETRY="true",
               HOME=str(folder), TMPDIR=str(folder))
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
    import base64

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


def test_anonymous_calls_are_refused(server):
    uri = server["uri"]
    assert status_of(uri, "/health") == 200  # the probes need no login
    assert status_of(uri, "/api/2.0/mlflow/experiments/search", "POST") == 401
    assert status_of(uri, "/api/2.0/mlflow/users/get?username=admin") == 401
    assert status_of(uri, "/api/2.0/mlflow-artifacts/artifacts") == 401
    assert status_of(uri, "/api/2.0/mlflow/experiments/search", "POST", auth=(ADMIN, "wrong-password-123")) == 401
    assert status_of(uri, "/api/2.0/mlflow/experiments/search", "POST", auth=(ADMIN, ADMIN_PASSWORD)) == 200


def test_wrong_admin_password_stops_the_script_in_one_line(server):
    result = run_script(server["uri"], ADMIN, "not-the-admin-password")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("mlflow_user: error: ")
    assert no_password_in(result.stderr) and "not-the-admin-password" not in result.stderr


def test_training_user_must_not_be_the_admin(server):
    result = run_script(server["uri"], ADMIN, ADMIN_PASSWORD, user=ADMIN)
    assert result.returncode == 1 and "is the admin" in result.stderr


def test_training_user_is_created_then_updated_and_logs_runs(server, monkeypatch):
    from mlflow.server import get_app_client

    uri = server["uri"]
    created = run_script(uri, ADMIN, ADMIN_PASSWORD)
    assert created.returncode == 0, created.stderr
    assert created.stdout == f"mlflow_user: training user '{TRAINING}' created on {uri}\n"
    again = run_script(uri, ADMIN, ADMIN_PASSWORD)
    assert again.returncode == 0 and "updated (password)" in again.stdout
    for result in (created, again):
        assert no_password_in(result.stdout + result.stderr)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    assert get_app_client("basic-auth", tracking_uri=uri).get_user(TRAINING).is_admin is False

    # What a training pod does, with the credentials of the Secret `mlflow-training`.
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", TRAINING)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", TRAINING_PASSWORD)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("t2t-auth-test")
    run = client.create_run(experiment)
    client.log_param(run.info.run_id, "model", "t2t_vit_7")
    client.log_metric(run.info.run_id, "loss", 1.5)
    client.log_text(run.info.run_id, "step 1", "notes.txt")  # through the artifact proxy
    client.set_terminated(run.info.run_id)
    client.create_registered_model("t2t-auth-test-model")
    assert client.get_metric_history(run.info.run_id, "loss")[0].value == 1.5
    assert any(a.path == "notes.txt" for a in client.list_artifacts(run.info.run_id))
    with pytest.raises(MlflowException, match="403"):  # no admin: cannot manage users
        get_app_client("basic-auth", tracking_uri=uri).create_user("intruder", "intruder-password-1")

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-training-password")
    with pytest.raises(MlflowException, match="401|Unauthorized|UNAUTHENTICATED"):
        mlflow.MlflowClient(tracking_uri=uri).get_experiment(experiment)


def test_no_password_on_the_servers_command_lines_or_in_its_log(server):
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != server["pid"]:
                continue
            command_line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ProcessLookupError):
            continue
        assert no_password_in(command_line), command_line
    assert no_password_in((server["folder"] / "server.log").read_text())
