"""A real S3 API on 127.0.0.1 for the object-storage tests: moto's server, started once per test module.

Import the fixture in a test module: ``from s3help import moto_s3  # noqa: F401``. The fixture puts test
credentials and ``AWS_ENDPOINT_URL`` into the environment (as a deployment would) and restores it after.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with credentials and endpoint in the environment; yields the endpoint."""
    pytest.importorskip("s3fs")  # pip install 'scd-atoms[s3]'; a failure in CI (see tests/conftest.py)
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.skip("missing dependency: moto[server] (no moto_server executable)")
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    # fsspec caches filesystems by their arguments; a cached one keeps the endpoint of an earlier module's server
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("moto_server did not start")
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        s3fs.S3FileSystem.clear_instance_cache()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3fs_for(endpoint: str, **credentials: str) -> Any:
    """A fresh (uncached) s3fs filesystem on the moto endpoint."""
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True, **credentials)


def read_only_keys(endpoint: str, user: str = "reader") -> dict[str, str]:
    """Access keys of a new IAM user allowed to read and list S3 but not to write (created while moto does not
    yet enforce authentication)."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:ListAllMyBuckets"], "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def enforce_auth(endpoint: str, on: bool) -> None:
    """Make moto check signatures and IAM policies on every request (on) or accept any request (off)."""
    body = b"0" if on else b"inf"
    with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=body, method="POST",
                                                       headers={"Content-Type": "text/plain"}), timeout=30):
        pass


def bucket_digest(fs: Any, root: str) -> dict[str, str]:
    """sha256 of every object under ``root`` (``bucket/prefix``), by name relative to it."""
    fs.invalidate_cache()
    root = root.removeprefix("s3://").rstrip("/")
    return {p[len(root) + 1:]: hashlib.sha256(fs.cat_file(p)).hexdigest() for p in sorted(fs.find(root))}
