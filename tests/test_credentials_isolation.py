"""Unreadable S3 shards (no credentials anywhere) fail in preflight, in one line.

The test shuts every credential source boto3 reads (environment, container and web-identity
variables, shared config and credentials files, the legacy boto config, EC2 instance
metadata), then checks that boto3 really finds nothing before it tests our error.
"""

import os

import pytest

from t2t_dist.config import ConfigError, load_config
from t2t_dist.launch import prepare, preflight


@pytest.fixture
def no_aws_credentials(tmp_path, monkeypatch):
    """An environment where boto3 resolves no credentials, whatever this machine holds."""
    import boto3

    from t2t_dist import storage

    for name in list(os.environ):
        if name.startswith("AWS_") or name == "BOTO_CONFIG":
            monkeypatch.delenv(name)  # keys, session token, profile, container/web-identity, role
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.aws, ~/.boto
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("BOTO_CONFIG", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probe
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setattr(storage, "_SESSION", None)  # forget credentials an earlier test resolved
    assert boto3.session.Session().get_credentials() is None, "a credential source is still open"


def test_unreadable_s3_shards_fail_in_preflight(no_aws_credentials, digits_shards, tmp_path,
                                                monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    config = prepare(load_config(overrides=[
        "data.train_urls=s3://no-bucket/train/digits-train-{0000..0001}.tar",
        f"data.val_urls={digits_shards['val']}", "model.name=t2t_vit_tiny", "model.img_size=32",
        "model.num_classes=10", "data.global_batch=16", f"run.storage_path={tmp_path}/runs",
        f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "scaling.num_workers=2"]))
    with pytest.raises(ConfigError, match=r"data.train_urls='s3://no-bucket/.*' cannot be read: "
                                          r"NoCredentialsError") as error:
        preflight(config)
    assert "\n" not in str(error.value)
