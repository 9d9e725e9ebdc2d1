"""A real local Ray for the session: two CPUs, Ray Serve's HTTP proxy on a free port."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .busy import RAY_ON_BUSY_CORES

ROOT = str(Path(__file__).resolve().parent.parent.parent)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    ray = pytest.importorskip(
        "ray",
        reason="the Ray tests need ray (the ray extra; the README's test command installs it)",
    )
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    for name, value in RAY_ON_BUSY_CORES.items():
        os.environ.setdefault(name, value)  # the local cluster's processes inherit them
    # The workers import tests.on_ray.models (where build functions live) from the checkout.
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, **RAY_ON_BUSY_CORES}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_cluster: Any) -> Iterator[int]:
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        serve.shutdown()
