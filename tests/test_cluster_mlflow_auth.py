"""The MLflow side of cluster/k8s/mlflow.yaml against a real ``mlflow server --app-name
basic-auth`` on 127.0.0.1: the manifest's arguments and auth settings (basic_auth.ini from its
ConfigMap), with SQLite standing in for PostgreSQL, and the Job's script
cluster/k8s/mlflow_user.py managing the training user.

Anonymous calls get 401; the script creates the training user (not an admin) and, run again,
updates it; the training user logs runs, artifacts (through the server's proxy) and models,
and cannot manage users; wrong credentials stop the script in one line; no password appears
on a command line or in any output. The job side (t2t-dist commands with these credentials)
is tests/test_credentials_leak.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (Flask-WTF)")

from mlflow_auth import (ADMIN, ADMIN_PASSWORD, TRAINING, TRAINING_PASSWORD,  # noqa: E402
                         basic_auth_server, no_password_in, run_script, status_of)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with basic_auth_server(tmp_path_factory.mktemp("mlflow-auth")) as running:
        yield running


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

    # The server caches checks that passed (basic_auth.ini): the password just used, changed
    # by the script, stops working at once (one worker here, the one that changed it).
    changed = run_script(uri, ADMIN, ADMIN_PASSWORD, password="t2t-test-training-password-new")
    assert changed.returncode == 0 and "updated (password)" in changed.stdout
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", TRAINING_PASSWORD)
    with pytest.raises(MlflowException, match="401|Unauthorized|UNAUTHENTICATED"):
        mlflow.MlflowClient(tracking_uri=uri).get_experiment(experiment)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "t2t-test-training-password-new")
    assert mlflow.MlflowClient(tracking_uri=uri).get_experiment(experiment).name == "t2t-auth-test"


def test_no_password_on_the_servers_command_lines_or_in_its_log(server):
    command_lines = []
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
        command_lines.append(command_line)
    # The server and its one worker; no MLflow job runner (the manifest turns it off).
    assert len(command_lines) == 2 and not [line for line in command_lines
                                            if "huey" in line or "job_runner" in line], command_lines
    assert no_password_in((server["folder"] / "server.log").read_text())
