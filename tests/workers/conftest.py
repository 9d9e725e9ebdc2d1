"""A real local SQS and S3 endpoint (moto's server, its own process) for the worker tests.

The server runs through ``moto_server.py``, which makes moto's deletes safe
from concurrent requests (see there).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SERVER = Path(__file__).resolve().parent / "moto_server.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Aws:
    """boto3 clients for the local endpoint, and fresh queues and buckets on it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def client(self, service: str) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            service,
            endpoint_url=self.url,
            config=Config(max_pool_connections=64),
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def queue(self, name: str = "q", **attributes: str) -> str:
        unique = f"{name}-{uuid.uuid4().hex[:8]}"
        url: str = self.client("sqs").create_queue(QueueName=unique, Attributes=attributes)[
            "QueueUrl"
        ]
        return url

    def bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:8]}"
        self.client("s3").create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def aws() -> Iterator[Aws]:
    """moto's server on a free port, in a process of its own, for the session."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server", reason="the worker tests need moto[server] (test extra)")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-P", str(SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert process.poll() is None, "moto's server exited"
            assert time.monotonic() < deadline, "moto's server did not start"
            time.sleep(0.1)
    try:
        yield Aws(url)
    finally:
        process.terminate()
        process.wait(10)
