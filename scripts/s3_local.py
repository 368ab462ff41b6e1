"""A local S3-compatible server for tests and benchmarks: moto in server mode on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def client(endpoint: str):
    """A boto3 S3 client for the local server at ``endpoint`` (to put and read objects directly)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


@contextmanager
def local_s3(log_dir: Path, conn_id: str = "s3_test", bucket: str = "batch-data"):
    """An S3-compatible server (moto in server mode) on 127.0.0.1 with one bucket, and an Airflow
    connection ``conn_id`` (environment variable) pointing at it. Yields ``(endpoint_url, bucket)``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    log = open(log_dir / "moto.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    output = (log_dir / "moto.log").read_text()
                    raise RuntimeError(f"moto_server did not start: {output}") from None
                time.sleep(0.2)
        client(endpoint).create_bucket(Bucket=bucket)
        var = f"AIRFLOW_CONN_{conn_id.upper()}"
        os.environ[var] = json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"},
            }
        )
        try:
            yield endpoint, bucket
        finally:
            os.environ.pop(var, None)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
