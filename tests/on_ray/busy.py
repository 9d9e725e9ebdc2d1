"""Settings that let a local Ray start on a machine whose cores are busy (CI with other jobs)."""

from __future__ import annotations

#: Ray's environment for the tests and the examples they run.
#: - Serve's controller kills a proxy not ready within 5 s (health checks,
#:   10 s): on busy cores that is a start refused, not a fault; given time.
#: - Ray starts its workers at nice 15, so that against busy cores at nice 0
#:   a worker gets a sliver of a core: a proxy took 100 s to import Serve,
#:   past the 60 s `serve.start` waits (not a setting). Workers run as the
#:   test does.
RAY_ON_BUSY_CORES = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    "RAY_worker_niceness": "0",
}
