"""Real HTTP servers for the tests: an app on uvicorn or werkzeug, in a thread."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

import mds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """A running server: its base URL, its runtime, and a client for it."""

    def __init__(self, kind: str, url: str, runtime: mds.Runtime) -> None:
        self.kind = kind
        self.url = url
        self.runtime = runtime
        self.client = httpx.Client(base_url=url, timeout=30)


@contextmanager
def running(kind: str, app: Any, runtime: mds.Runtime) -> Iterator[Served]:
    """``app`` (serving ``runtime``) on uvicorn for ``"fastapi"``, else on werkzeug.

    A FastAPI app's lifespan stops the runtime; after a Flask app, this does.
    """
    if kind == "fastapi":
        import uvicorn

        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        served = Served(kind, f"http://127.0.0.1:{port}", runtime)
        try:
            yield served
        finally:
            served.client.close()
            server.should_exit = True
            thread.join(30)
        return
    from werkzeug.serving import make_server

    wsgi = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=wsgi.serve_forever, daemon=True)
    thread.start()
    served = Served(kind, f"http://127.0.0.1:{wsgi.server_port}", runtime)
    try:
        yield served
    finally:
        served.client.close()
        wsgi.shutdown()
        thread.join(30)
        runtime.stop_sync()


def wait_until_ready(url: str, process: subprocess.Popen[str], what: str) -> None:
    """Wait (60 s at most) until the server ``process`` runs answers ``/health/ready`` with 200."""
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None, process.communicate()[0]
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{what} did not become ready"
        time.sleep(0.1)
