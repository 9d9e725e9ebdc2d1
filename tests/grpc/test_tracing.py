"""Traces over gRPC: the caller's traceparent and x-request-id metadata continue into mds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import mds
import mds.grpc
from mds import _tracing
from tests.grpc.conftest import BATCHED, Scale

pytest.importorskip("grpc")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
pytest.importorskip("opentelemetry.sdk", reason="needs opentelemetry-sdk (the test extra)")

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{CALLER}-01"
SERVICE = "inference.GRPCInferenceService"


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


def wait_for(exporter: InMemorySpanExporter, name: str, count: int = 1) -> list[ReadableSpan]:
    # Spans end in the server's loop, a moment after the reply is sent.
    deadline = time.monotonic() + 10
    while True:
        found = [s for s in exporter.get_finished_spans() if s.name == name]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def features() -> Any:
    found = tritonclient_grpc.InferInput("x", [4], "FP32")
    found.set_data_from_numpy(np.zeros(4, np.float32))
    return found


def test_the_callers_trace_and_request_id_continue_into_mds(spans: InMemorySpanExporter) -> None:
    runtime = mds.Runtime()
    runtime.add_model("scale", Scale, BATCHED)
    with mds.grpc.Server(runtime, "127.0.0.1:0", load="wait") as server:
        client = tritonclient_grpc.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            headers = {"traceparent": TRACEPARENT, "x-request-id": "r-7"}
            client.infer("scale", [features()], request_id="order-7", headers=headers)
            client.infer("scale", [features()], request_id="order-8")
            got: list[Any] = []
            client.start_stream(lambda result, error: got.append(error), headers=headers)
            client.async_stream_infer("scale", [features()], request_id="in-stream")
            client.stop_stream()  # waits for the stream's responses
            assert got == [None]
        finally:
            client.close()
        first, second, streamed = wait_for(spans, "mds.serve scale", 3)
        (unary, untraced) = wait_for(spans, f"{SERVICE}/ModelInfer", 2)
        (stream,) = wait_for(spans, f"{SERVICE}/ModelStreamInfer")
    # The server span's parent is the caller's span; the request's, the server span.
    assert unary.kind.name == "SERVER" and dict(unary.attributes or {})["rpc.method"] == (
        "ModelInfer"
    )
    assert unary.parent is not None and format(unary.parent.span_id, "016x") == CALLER
    assert {format(s.context.trace_id, "032x") for s in (unary, first, stream, streamed)} == {TRACE}
    assert first.parent is not None and first.parent.span_id == unary.context.span_id
    assert dict(first.attributes or {})["mds.request.id"] == "r-7"  # the metadata's, first
    # Without metadata: a trace of its own, named by the request's id.
    assert untraced.parent is None
    assert second.parent is not None and second.parent.span_id == untraced.context.span_id
    assert dict(second.attributes or {})["mds.request.id"] == "order-8"
    # A stream: one server span, each request's span under it.
    assert streamed.parent is not None and streamed.parent.span_id == stream.context.span_id
    assert dict(streamed.attributes or {})["mds.request.id"] == "r-7"
