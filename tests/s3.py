"""A real S3-compatible server for tests (moto's server mode, PyPI ``moto[server]``) and the
helpers around it (not a conftest: test modules import it)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from procs import free_port

BUCKET = "tsn-test"
REGION = "us-east-1"
# Variables of a developer's own AWS set-up that must not leak into a test.
OTHER_AWS_VARS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
                  "AWS_SHARED_CREDENTIALS_FILE")


def start_server(log_path: Path) -> tuple[dict, subprocess.Popen]:
    """``python -m moto.server`` on a free loopback port, with request signing checked: an IAM
    user allowed ``s3:*`` and its key are made first, then moto's authentication is switched
    on, so a wrong key is refused as a real server refuses it. Returns ({endpoint,
    access_key, secret_key, bucket}, the server process)."""
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start:\n{Path(log_path).read_text()[-2000:]}")
                time.sleep(0.2)
        setup = {"endpoint_url": endpoint, "region_name": REGION, "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **setup)
        iam.create_user(UserName="tsn")
        iam.put_user_policy(UserName="tsn", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="tsn")["AccessKey"]
        boto3.client("s3", **setup).create_bucket(Bucket=BUCKET)
        # From now on every request must be signed with a known key (moto's IAM emulation).
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"}), timeout=5)
    except BaseException:
        stop_server(proc)
        raise
    return {"endpoint": endpoint, "access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"],
            "bucket": BUCKET}, proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def environment(server: dict) -> dict:
    """The standard AWS variables a user sets for ``server`` (`dataloading.store.storage`)."""
    return {"AWS_ENDPOINT_URL": server["endpoint"], "AWS_ACCESS_KEY_ID": server["access_key"],
            "AWS_SECRET_ACCESS_KEY": server["secret_key"], "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION}


def client(server: dict):
    """A boto3 S3 client of ``server`` (the tests' own view of the bucket)."""
    import boto3

    return boto3.client("s3", endpoint_url=server["endpoint"], region_name=REGION,
                        aws_access_key_id=server["access_key"], aws_secret_access_key=server["secret_key"])


def upload_dir(server: dict, local_dir, prefix: str, skip=()) -> str:
    """Upload every file of ``local_dir`` under ``s3://bucket/prefix`` (the packer writes
    locally only); returns the URI. ``skip``: relative paths left out."""
    c, root = client(server), Path(local_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in skip:
            c.upload_file(str(path), server["bucket"], f"{prefix}/{rel}")
    return f"s3://{server['bucket']}/{prefix}"


def keys_under(server: dict, prefix: str) -> set[str]:
    pages = client(server).get_paginator("list_objects_v2").paginate(Bucket=server["bucket"], Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}
