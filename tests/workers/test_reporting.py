"""A worker in its runtime's health, statistics and metrics, beside HTTP routes in one app."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

import mds
import mds.fastapi
import mds.workers

from ..servers import running
from .conftest import Aws
from .models import Scorer, runtime_with
from .test_sqs import counts, eventually, results, send

pytestmark = pytest.mark.slow


def test_a_worker_beside_http_routes_shows_in_health_and_metrics(aws: Aws) -> None:
    pytest.importorskip("prometheus_client")
    from fastapi import FastAPI

    queue, dead, bucket = aws.queue("claims"), aws.queue("dead"), aws.bucket()
    runtime = runtime_with(Scorer())
    worker = mds.workers.QueueWorker(
        runtime,
        "scorer",
        mds.workers.SqsSource(queue, dead_letters=dead, client=aws.client("sqs")),
        mds.workers.S3Sink(bucket, client=aws.client("s3")),
        wait=0.2,
        name="claims",
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with worker:  # add_routes' lifespan runs the runtime around this one
            yield

    app = FastAPI(lifespan=lifespan)
    mds.fastapi.add_routes(app, runtime, metrics=True)
    ids = send(aws, queue, [json.dumps({"x": [i, 0, 0, 0]}) for i in range(5)] + ["{"])
    with running("fastapi", app, runtime) as served:
        eventually(lambda: worker.statistics().completed == 5, "five served")
        eventually(lambda: worker.statistics().dead_lettered == 1, "one dead-lettered")
        ready = served.client.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json()["workers"] == {
            "claims": {
                "name": "claims",
                "queue": queue.rsplit("/", 1)[-1],
                "target": "scorer",
                "state": "receiving",
                "ready": True,
                "reason": None,
            }
        }
        assert served.client.post("/models/scorer/infer", json={"x": [1, 2, 3, 4]}).json() == 10.0
        stats = runtime.worker_statistics()["claims"]
        assert (stats.name, stats.received, stats.completed, stats.dead_lettered) == (
            "claims",
            6,
            5,
            1,
        )
        metrics = served.client.get("/metrics").text
    labels = f'queue="{queue.rsplit("/", 1)[-1]}",target="scorer",worker="claims"'
    for line in [
        f"mds_worker_received_messages_total{{{labels}}} 6.0",
        f'mds_worker_messages_total{{outcome="completed",{labels}}} 5.0',
        f'mds_worker_messages_total{{outcome="dead_lettered",{labels}}} 1.0',
        f'mds_worker_messages_total{{outcome="released",{labels}}} 0.0',
        f"mds_worker_messages_in_flight{{{labels}}} 0.0",
        f'mds_worker_state{{{labels},state="receiving"}} 1.0',
        f'mds_worker_state{{{labels},state="backing_off"}} 0.0',
    ]:
        assert _has(metrics, line), line
    assert results(aws, bucket) == {ids[i]: float(i) for i in range(5)}
    assert runtime.health_sync().workers == {}  # stopped: no longer reported


def _has(exposition: str, line: str) -> bool:
    """Whether a sample is there, whatever order its labels come in."""
    name, _, rest = line.partition("{")
    labels, _, value = rest.rpartition("} ")
    wanted = set(labels.split(","))
    for found in exposition.splitlines():
        found_name, _, found_rest = found.partition("{")
        found_labels, _, found_value = found_rest.rpartition("} ")
        if found_name == name and set(found_labels.split(",")) == wanted and found_value == value:
            return True
    return False


class Slow(Scorer):
    """A Scorer whose ``init`` waits for the test to let it load."""

    def __init__(self, loaded: threading.Event) -> None:
        super().__init__()
        self.loaded = loaded

    def init(self, context: Any) -> None:
        assert self.loaded.wait(60)


def loading(
    aws: Aws, loaded: threading.Event, queue: str, dead: str, bucket: str, **options: Any
) -> mds.workers.QueueWorker:
    """A worker that starts its runtime, whose model loads once ``loaded`` is set."""
    runtime = mds.Runtime()
    runtime.add_model("scorer", lambda: Slow(loaded))
    worker = mds.workers.QueueWorker(
        runtime,
        "scorer",
        mds.workers.SqsSource(queue, dead_letters=dead, client=aws.client("sqs")),
        mds.workers.S3Sink(bucket, client=aws.client("s3")),
        load="background",
        wait=0.2,
        **options,
    )
    return worker


def test_the_worker_waits_for_its_model_before_it_takes_messages(aws: Aws) -> None:
    queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
    send(aws, queue, [json.dumps({"x": [i, 1, 0, 0]}) for i in range(4)])
    loaded = threading.Event()
    # max_deliveries=1: a message received before the model is ready would die at once.
    worker = loading(aws, loaded, queue, dead, bucket, max_deliveries=1)
    worker.start_sync()
    try:
        eventually(lambda: worker.state is mds.workers.WorkerState.WAITING, "waiting")
        health = worker.health()
        assert health.ready is False
        assert health.reason == "the worker is waiting: 'scorer' is not ready (loading)"
        assert counts(aws, queue) == (4, 0)  # none taken while the model loads
        loaded.set()
        eventually(lambda: worker.statistics().completed == 4, "served once loaded")
    finally:
        worker.stop_sync()
    stats = worker.statistics()
    assert (stats.released, stats.dead_lettered) == (0, 0)


def test_two_workers_on_one_runtime_need_two_names(aws: Aws) -> None:
    first, second, dead, bucket = aws.queue("a"), aws.queue("b"), aws.queue("dead"), aws.bucket()
    runtime = runtime_with(Scorer())

    def worker(queue: str, name: str | None = None) -> mds.workers.QueueWorker:
        return mds.workers.QueueWorker(
            runtime,
            "scorer",
            mds.workers.SqsSource(queue, dead_letters=dead, client=aws.client("sqs")),
            mds.workers.S3Sink(bucket, client=aws.client("s3")),
            wait=0.2,
            name=name,
        )

    with runtime:
        one = worker(first, name="scoring")
        with one:
            with pytest.raises(mds.ConfigError, match="a worker named 'scoring' already runs"):
                worker(second, name="scoring").start_sync()
            with worker(second):  # named after its queue
                names = sorted(runtime.health_sync().workers)
                assert names == sorted(["scoring", second.rsplit("/", 1)[-1]])
        assert runtime.running  # a worker leaves a runtime it did not start running
        assert runtime.health_sync().workers == {}


def test_a_worker_stopped_while_it_waits_stops_and_can_run_again(aws: Aws) -> None:
    queue, dead, bucket = aws.queue("in"), aws.queue("dead"), aws.bucket()
    loaded = threading.Event()
    worker = loading(aws, loaded, queue, dead, bucket)
    runtime = worker.runtime
    worker.start_sync()
    eventually(lambda: worker.state is mds.workers.WorkerState.WAITING, "waiting")
    loaded.set()  # the runtime's stop waits for the load in progress
    worker.stop_sync()
    assert worker.state is mds.workers.WorkerState.STOPPED and not runtime.running
    assert worker.health().reason == "the worker is stopped"  # not the old wait's reason
    ids = send(aws, queue, [json.dumps({"x": [i, 0, 0, 0]}) for i in range(3)])
    worker.start_sync()  # a worker that was stopped runs again
    try:
        eventually(lambda: worker.statistics().completed == 3, "served on the second run")
        assert worker.state is not mds.workers.WorkerState.STOPPED
    finally:
        worker.stop_sync()
    assert results(aws, bucket) == {ids[i]: float(i) for i in range(3)}
