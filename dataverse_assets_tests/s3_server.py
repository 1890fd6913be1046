"""An S3-compatible server for the tests of the archive on object storage: moto's server mode,
in this process on a free loopback port, with authentication on (an IAM user whose access key
the tests use, so a wrong secret is refused as a real store would refuse it)."""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dataverse_assets_tests.servers import free_port, missing

# Any region: moto serves them all on one endpoint.
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    access_key_id: str
    secret_access_key: str
    _buckets = itertools.count(1)

    def client(self, secret: str | None = None):
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=secret or self.secret_access_key)

    def new_bucket(self) -> str:
        name = f"mirror-archive-{next(self._buckets)}"
        self.client().create_bucket(Bucket=name)
        return name

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object of the bucket, key -> body."""
        client = self.client()
        keys = [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket) for item in page.get("Contents", [])]
        return {key: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}

    def environment(self) -> dict[str, str]:
        """The AWS variables a process needs to use this server (boto3's standard chain)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
                "AWS_DEFAULT_REGION": REGION}


@contextmanager
def moto_s3_server() -> Iterator[S3Server]:
    """Start moto's server (skip, or fail under CI=true, when moto is not installed)."""
    try:
        import boto3
        import httpx
        from moto.server import ThreadedMotoServer
    except ImportError:
        missing("moto[server] and boto3 are not installed (pip install -e '.[dev]')",
                "the archive on S3 is tested against moto's server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        bootstrap = {"endpoint_url": endpoint, "region_name": REGION,
                     "aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        iam = boto3.session.Session().client("iam", **bootstrap)
        iam.create_user(UserName="mirror")
        iam.put_user_policy(UserName="mirror", PolicyName="archive", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="mirror")["AccessKey"]
        # From now on every request must be signed with a known key.
        httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"0").raise_for_status()
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        try:
            httpx.post(f"{endpoint}/moto-api/reset-auth", content=b"inf")
        finally:
            server.stop()


def use_server(monkeypatch, server: S3Server, tmp_path) -> None:
    """The test's process finds the server's credentials as boto3 would anywhere (and no
    ~/.aws files, no instance metadata)."""
    for name, value in server.environment().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert "AWS_ACCESS_KEY_ID" in os.environ
