"""Create or update the MLflow training user on a server running MLflow's basic-auth app.

Run by the Job ``mlflow-user`` of mlflow.yaml (image: cluster/Dockerfile, target mlflow):

    MLFLOW_TRACKING_URI=http://mlflow:5000 \\
    MLFLOW_TRACKING_USERNAME=<admin> MLFLOW_TRACKING_PASSWORD=<admin password> \\
    T2T_MLFLOW_USERNAME=<training user> T2T_MLFLOW_PASSWORD=<its password> \\
        python mlflow_user.py

Waits for the server's /health, then creates the training user, or sets its password if it
exists (the way to rotate it), and makes sure it is not an admin: training pods log in as a
user that manages only the experiments and models it creates. Idempotent. Prints the user's
name, never a password; any failure is one line on stderr and exit 1.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request
import warnings

WAIT_S = float(os.environ.get("T2T_MLFLOW_WAIT_S", 300))


def wait_for_server(uri: str, timeout: float) -> None:
    """Until ``uri``/health answers 200 (it needs no login), or RuntimeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the MLflow server at {uri} did not answer /health in {timeout:.0f} s")
        time.sleep(2)


def ensure_user(uri: str, username: str, password: str) -> str:
    """Create ``username`` or set its password; never an admin. Returns what was done."""
    from mlflow.exceptions import RestException
    from mlflow.server import get_app_client

    client = get_app_client("basic-auth", tracking_uri=uri)  # logs in as MLFLOW_TRACKING_USERNAME
    try:
        user = client.get_user(username)
    except RestException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(username, password)
        return "created"
    client.update_user_password(username, password)
    if user.is_admin:
        client.update_user_admin(username, False)
        return "updated (password; admin rights removed)"
    return "updated (password)"


def main() -> int:
    missing = [name for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                                 "MLFLOW_TRACKING_PASSWORD", "T2T_MLFLOW_USERNAME",
                                 "T2T_MLFLOW_PASSWORD") if not os.environ.get(name)]
    if missing:
        print(f"mlflow_user: error: {', '.join(missing)} not set", file=sys.stderr)
        return 1
    uri, username = os.environ["MLFLOW_TRACKING_URI"], os.environ["T2T_MLFLOW_USERNAME"]
    if username == os.environ["MLFLOW_TRACKING_USERNAME"]:
        print(f"mlflow_user: error: the training user {username!r} is the admin: give training "
              f"its own user", file=sys.stderr)
        return 1
    try:
        wait_for_server(uri, WAIT_S)
        with warnings.catch_warnings():  # the server modules' deprecation notes: not for this log
            warnings.simplefilter("ignore")
            done = ensure_user(uri, username, os.environ["T2T_MLFLOW_PASSWORD"])
    except Exception as error:  # one line for the Job's log, whatever MLflow raised
        message = " ".join(str(error).split())
        print(f"mlflow_user: error: {type(error).__name__}: {message}", file=sys.stderr)
        return 1
    print(f"mlflow_user: training user {username!r} {done} on {uri}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
