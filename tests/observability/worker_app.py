"""An app for the multi-worker test: each worker process serves its own runtime.

``uvicorn --factory worker_app:make --workers 2``, with ``MDS_TEST_METRICS_DIR``
set: every worker's collector writes to that directory, and any worker's
``/metrics`` adds up all of them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import prometheus_client
from fastapi import FastAPI

import mds
import mds.fastapi
import mds.prometheus


class Pid(mds.ModelHandler[Any, int]):
    """Answers with the worker's process id, so the test sees which worker served."""

    def infer(self, batch: Sequence[Any]) -> list[int]:
        return [os.getpid()] * len(batch)


def make() -> FastAPI:
    runtime = mds.Runtime()
    runtime.add_model("pid", Pid)
    registry = prometheus_client.CollectorRegistry()
    registry.register(
        mds.prometheus.Collector(
            runtime, directory=os.environ["MDS_TEST_METRICS_DIR"], interval=0.1
        )
    )
    app = FastAPI()
    mds.fastapi.add_routes(app, runtime, metrics=registry)
    return app
