"""A worker's health and statistics over plain HTTP, for Kubernetes' probes on ``mds worker``.

A worker takes no requests, so it has no web app; this small server (the
standard library's, in a thread of its own) answers the probes:

- ``GET /health/live``: 200 while the worker runs;
- ``GET /health/ready``: 200 when every model is ready and the worker is
  receiving (not backing off from a broker that fails, not draining);
- ``GET /statistics``: the worker's statistics and the models', as JSON.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec

from .core import QueueWorker, WorkerState

__all__ = ["HealthServer"]

# Live while the process is up (loading models too): readiness says whether it serves.
_LIVE = tuple(state for state in WorkerState if state is not WorkerState.STOPPED)


class HealthServer:
    """The probes' server for ``worker``, on ``host:port`` (port 0: a free one)."""

    def __init__(self, worker: QueueWorker, host: str = "0.0.0.0", port: int = 8080) -> None:
        self.worker = worker
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = outer.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds: no access log

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="mds-worker-health", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, path: str) -> tuple[int, bytes]:
        worker = self.worker
        state = worker.state
        if path == "/health/live":
            live = state in _LIVE
            return (200 if live else 503), msgspec.json.encode({"live": live, "state": state})
        if path == "/health/ready":
            models_ready = worker.runtime.running and worker.runtime.health_sync().ready
            own = worker.health()
            ready = models_ready and own.ready
            body = {
                "ready": ready,
                "state": state,
                "models_ready": models_ready,
                "reason": own.reason if not own.ready else None,
            }
            return (200 if ready else 503), msgspec.json.encode(body)
        if path == "/statistics":
            statistics = worker.runtime.statistics() if worker.runtime.running else {}
            found = {"worker": worker.statistics(), "models": statistics}
            return 200, msgspec.json.encode(found)
        return 404, msgspec.json.encode({"error": f"no route {path[:100]!r}", "type": "NotFound"})
