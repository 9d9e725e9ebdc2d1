"""Traces through real HTTP servers: the caller's traceparent continues into mds's spans."""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

import mds
from mds import _tracing

from ..servers import running

pytest.importorskip("opentelemetry.sdk", reason="needs opentelemetry-sdk (the test extra)")
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind

TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{CALLER}-01"


class Doubler(mds.ModelHandler[Any, dict[str, Any]]):
    """``{"x": numbers}`` in (mds's JSON, or the protocol's tensors), ``{"y": 2x}`` out."""

    def preprocess(self, request: Any) -> Any:
        if not isinstance(request, dict) or "x" not in request:
            raise mds.InvalidInput("expected {'x': numbers}")
        return np.asarray(request["x"], dtype=np.float64)

    def infer(self, batch: Sequence[Any]) -> list[dict[str, Any]]:
        return [{"y": 2 * x} for x in batch]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _tracing.use(provider)
    try:
        yield exporter
    finally:
        _tracing.use(None)
        provider.shutdown()


def app_for(kind: str, runtime: mds.Runtime) -> Any:
    framework = pytest.importorskip(kind)
    if kind == "fastapi":
        pytest.importorskip("uvicorn")
    adapter = importlib.import_module(f"mds.{kind}")
    app = framework.FastAPI() if kind == "fastapi" else framework.Flask(__name__)
    adapter.add_routes(app, runtime)
    return app


def wait_for(exporter: InMemorySpanExporter, name: str, count: int = 1) -> list[ReadableSpan]:
    # Spans end in the server's threads, a moment after the reply is sent.
    deadline = time.monotonic() + 10
    while True:
        found = [s for s in exporter.get_finished_spans() if s.name == name]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


@pytest.mark.parametrize("kind", ["fastapi", "flask"])
def test_a_traceparent_becomes_the_parent_of_the_server_and_request_spans(
    kind: str, spans: InMemorySpanExporter
) -> None:
    runtime = mds.Runtime()
    runtime.add_model("doubler", Doubler)
    with running(kind, app_for(kind, runtime), runtime) as served:
        deadline = time.monotonic() + 30
        while served.client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        reply = served.client.post(
            "/v2/models/doubler/infer",
            json={
                "id": "order-7",
                "inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [2.0]}],
            },
            headers={"traceparent": TRACEPARENT},
        )
        assert reply.status_code == 200, reply.text
        bad = served.client.post(
            "/models/doubler/infer",
            json="two",
            headers={"traceparent": TRACEPARENT, "X-Request-Id": "r-bad"},
        )
        assert bad.status_code == 400
        (request, failed) = wait_for(spans, "mds.serve doubler", 2)
        servers = wait_for(spans, "POST /v2/models/{name}/infer") + wait_for(
            spans, "POST /models/{name}/infer"
        )
        (infer,) = wait_for(spans, "mds.infer doubler")

    assert len(servers) == 2
    server = servers[0]
    # One trace, the caller's: the server span's parent is the caller's span.
    assert server.kind.name == "SERVER"
    assert server.parent is not None and format(server.parent.span_id, "016x") == CALLER
    assert {format(s.context.trace_id, "032x") for s in (server, request, failed)} == {TRACE}
    assert request.parent is not None and request.parent.span_id == server.context.span_id
    attributes = dict(request.attributes or {})
    assert attributes["mds.model.name"] == "doubler"
    assert attributes["mds.model.version"] == "1"
    assert attributes["mds.request.id"] == "order-7"  # the protocol's id
    assert attributes["mds.batch.size"] == 1
    children = {s.name for s in spans.get_finished_spans() if s.parent == request.context}
    assert {"mds.preprocess", "mds.queue"} <= children
    # The batch is a trace of its own, linked to the request it served.
    assert [link.context.span_id for link in infer.links] == [request.context.span_id]
    # The bad request: its error and its id, in the same trace.
    failed_attributes = dict(failed.attributes or {})
    assert failed.status.status_code.name == "ERROR"
    assert failed_attributes["error.type"].endswith("InvalidInput")
    assert failed_attributes["mds.request.id"] == "r-bad"


def test_without_a_traceparent_the_server_span_starts_a_trace(
    spans: InMemorySpanExporter,
) -> None:
    runtime = mds.Runtime()
    runtime.add_model("doubler", Doubler)
    with running("fastapi", app_for("fastapi", runtime), runtime) as served:
        deadline = time.monotonic() + 30
        while served.client.get("/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert served.client.post("/models/doubler/infer", json={"x": [1]}).json() == {"y": [2.0]}
        (server,) = wait_for(spans, "POST /models/{name}/infer")
        (request,) = wait_for(spans, "mds.serve doubler")
    assert server.parent is None
    assert request.parent is not None and request.parent.span_id == server.context.span_id


def test_the_hosts_own_server_span_is_kept_not_nested() -> None:
    fastapi = pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _tracing.use(provider)
    try:
        runtime = mds.Runtime()
        runtime.add_model("doubler", Doubler)
        app = fastapi.FastAPI()

        @app.middleware("http")
        async def instrumented(request: Any, call_next: Any) -> Any:
            # As opentelemetry-instrumentation-fastapi does: the host's SERVER span.
            tracer = provider.get_tracer("host")
            with tracer.start_as_current_span("host request", kind=SpanKind.SERVER):
                return await call_next(request)

        importlib.import_module("mds.fastapi").add_routes(app, runtime)
        with running("fastapi", app, runtime) as served:
            deadline = time.monotonic() + 30
            while served.client.get("/health/ready").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            reply = served.client.post(
                "/models/doubler/infer", json={"x": [1]}, headers={"traceparent": TRACEPARENT}
            )
            assert reply.status_code == 200
            (request,) = wait_for(exporter, "mds.serve doubler")
    finally:
        _tracing.use(None)
        provider.shutdown()
    servers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert {s.name for s in servers} == {"host request"}  # one per HTTP request, the host's
    assert request.parent is not None
    assert request.parent.span_id in {s.context.span_id for s in servers}


def test_fastapis_own_server_span_is_named_by_mds_route() -> None:
    # FastAPI's built-in telemetry names its span by the route its router
    # picks: such requests go through the router, not mds's lane past it.
    fastapi = pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        app = fastapi.FastAPI(telemetry={"tracer_provider": provider})
    except TypeError:
        pytest.skip("this FastAPI has no built-in telemetry (0.165 on)")
    runtime = mds.Runtime()
    runtime.add_model("doubler", Doubler)
    importlib.import_module("mds.fastapi").add_routes(app, runtime, load="wait")
    try:
        with TestClient(app) as client:
            reply = client.post("/models/doubler/infer", json={"x": [1]})
            assert reply.json() == {"y": [2.0]}
    finally:
        provider.shutdown()
    servers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert [s.attributes.get("http.route") for s in servers] == ["/models/{name}/infer"]
