"""OpenTelemetry spans: requests, batches linked to them, pipelines, errors, the caller."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import anyio
import pytest

pytest.importorskip(
    "opentelemetry.sdk.trace", reason="tracing tests need opentelemetry-sdk (the test extra)"
)

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

import mds
from mds import _logs, _tracing

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"


class Spans:
    """The spans a test's provider recorded, and a tracer for the test's own."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")

    def all(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.all() if span.name == name]

    def one(self, name: str) -> ReadableSpan:
        [span] = self.named(name)
        return span

    def children(self, parent: ReadableSpan) -> dict[str, ReadableSpan]:
        return {
            span.name: span
            for span in self.all()
            if span.parent is not None and span.parent.span_id == parent.context.span_id
        }


@pytest.fixture
def spans() -> Iterator[Spans]:
    """mds traces with a provider of the test's own (the global one is set once per process)."""
    recorded = Spans()
    _tracing.use(recorded.provider)
    try:
        yield recorded
    finally:
        _tracing.use(None)
        recorded.provider.shutdown()


class Steps(mds.ModelHandler[float, float]):
    """Every step overridden: doubles; fails on 13 in infer, on 7 in postprocess."""

    async def preprocess(self, request: float) -> float:
        return request

    async def infer(self, batch: Sequence[float]) -> list[Any]:
        return [ValueError("unlucky 13") if x == 13 else 2 * x for x in batch]

    async def postprocess(self, output: float) -> float:
        if output == 14:
            raise KeyError("no label for 14")
        return output


def within(child: ReadableSpan, parent: ReadableSpan) -> bool:
    assert child.start_time is not None and child.end_time is not None
    assert parent.start_time is not None and parent.end_time is not None
    return parent.start_time <= child.start_time <= child.end_time <= parent.end_time


async def test_a_request_has_a_span_with_its_steps_and_where_it_ran(spans: Spans) -> None:
    async with mds.ModelRuntime(Steps(), name="double", version="3") as model:
        assert await model.serve(2.0) == 4.0
    request = spans.one("mds.serve double")
    assert request.parent is None and request.kind is trace.SpanKind.INTERNAL
    attributes = dict(request.attributes or {})
    assert attributes["mds.model.name"] == "double"
    assert attributes["mds.model.version"] == "3"
    assert attributes["mds.batch.size"] == 1 and attributes["mds.batch.id"] == 1
    assert attributes["mds.instance"] == 0 and attributes["mds.device"] == "cpu"
    assert isinstance(attributes["mds.queue.wait"], float) and attributes["mds.queue.wait"] >= 0
    assert request.status.status_code is trace.StatusCode.UNSET
    children = spans.children(request)
    assert sorted(children) == ["mds.postprocess", "mds.preprocess", "mds.queue"]
    pre, queue, post = (children[n] for n in ("mds.preprocess", "mds.queue", "mds.postprocess"))
    assert all(within(child, request) for child in (pre, queue, post))
    assert pre.end_time <= queue.start_time <= queue.end_time <= post.start_time  # type: ignore[operator]


async def test_a_handler_without_steps_gets_only_the_queue(
    spans: Spans, doubler: type[mds.ModelHandler[float, float]]
) -> None:
    async with mds.ModelRuntime(doubler) as model:
        await model.serve(1.0)
    assert sorted(spans.children(spans.one("mds.serve Doubler"))) == ["mds.queue"]


async def test_a_batch_has_one_infer_span_linked_to_each_request(
    spans: Spans, recorder: Any
) -> None:
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=4))
    async with mds.ModelRuntime(recorder, config, name="echo") as model:
        async with anyio.create_task_group() as tasks:
            await recorder.busy(tasks, model, first=0)  # batch 1 computes, held
            for x in range(1, 5):
                tasks.start_soon(model.serve, x)
            await anyio.wait_all_tasks_blocked()
            recorder.release()
    assert recorder.sizes == [1, 4]
    infers = {dict(s.attributes or {})["mds.batch.id"]: s for s in spans.named("mds.infer echo")}
    assert sorted(infers) == [1, 2]
    batch = infers[2]
    assert batch.parent is None  # a trace of its own
    attributes = dict(batch.attributes or {})
    assert attributes["mds.batch.size"] == 4 and attributes["mds.batch.failed"] == 0
    assert attributes["mds.model.name"] == "echo" and attributes["mds.instance"] == 0
    requests = [
        s for s in spans.named("mds.serve echo") if dict(s.attributes or {})["mds.batch.id"] == 2
    ]
    assert len(requests) == 4
    assert {link.context.span_id for link in batch.links} == {s.context.span_id for s in requests}


async def test_a_failed_request_says_its_error_type(spans: Spans) -> None:
    async with mds.ModelRuntime(Steps(), name="double") as model:
        with pytest.raises(mds.InferenceError):
            await model.serve(13.0)
        with pytest.raises(mds.InferenceError, match="postprocess failed"):
            await model.serve(7.0)
        with pytest.raises(mds.InvalidInput):
            await model.serve(1.0, priority=5)
    failed = spans.named("mds.serve double")
    assert len(failed) == 3
    for span in failed:
        assert span.status.status_code is trace.StatusCode.ERROR
    kinds = sorted(dict(s.attributes or {})["error.type"] for s in failed)
    assert kinds == ["mds.InferenceError", "mds.InferenceError", "mds.InvalidInput"]
    assert "unlucky 13" in "".join(s.status.description or "" for s in failed)
    # the batch that computed 13 failed as a whole: its span says so too
    infer = [s for s in spans.named("mds.infer double") if s.status.status_code.name == "ERROR"]
    assert len(infer) == 1 and dict(infer[0].attributes or {})["mds.batch.failed"] == 1


async def test_a_cancelled_request_is_marked_cancelled(spans: Spans, recorder: Any) -> None:
    async with mds.ModelRuntime(recorder, name="echo") as model:
        async with anyio.create_task_group() as tasks:
            await recorder.busy(tasks, model, first=0)
            with anyio.move_on_after(0.01):
                await model.serve(1)
            recorder.release()
    [cancelled] = [
        s for s in spans.named("mds.serve echo") if s.status.status_code is trace.StatusCode.ERROR
    ]
    assert dict(cancelled.attributes or {})["error.type"] == "cancelled"


async def test_the_callers_span_is_the_parent(spans: Spans) -> None:
    async with mds.ModelRuntime(Steps(), name="double") as model:
        with spans.tracer.start_as_current_span("caller") as caller:
            await model.serve(1.0)
    request = spans.one("mds.serve double")
    assert request.parent is not None
    assert request.parent.span_id == caller.get_span_context().span_id
    assert request.context.trace_id == caller.get_span_context().trace_id


def test_serve_sync_from_a_thread_continues_the_threads_span(spans: Spans) -> None:
    """The model lives in mds's background loop; the caller's context crosses over."""
    parents: list[int] = []

    def caller(model: mds.ModelRuntime[float, float]) -> None:
        with spans.tracer.start_as_current_span("in a thread") as span:
            parents.append(span.get_span_context().span_id)
            assert model.serve_sync(1.0) == 2.0

    with mds.ModelRuntime(Steps(), name="double") as model:
        threads = [threading.Thread(target=caller, args=(model,)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    requests = spans.named("mds.serve double")
    assert sorted(s.parent.span_id for s in requests if s.parent is not None) == sorted(parents)


def test_serve_from_another_loop_continues_its_span(spans: Spans) -> None:
    async def caller(model: mds.ModelRuntime[float, float]) -> int:
        with spans.tracer.start_as_current_span("in another loop") as span:
            assert await model.serve(1.0) == 2.0
            return span.get_span_context().span_id

    with mds.ModelRuntime(Steps(), name="double") as model:
        parent = anyio.run(caller, model)
    request = spans.one("mds.serve double")
    assert request.parent is not None and request.parent.span_id == parent


async def test_a_pipeline_nests_its_nodes_and_their_requests(spans: Spans) -> None:
    def features(request: dict[str, Any]) -> float:
        return float(request["amount"])

    def join(outputs: dict[str, Any]) -> float:
        return float(sum(outputs.values()))

    pipeline = mds.Pipeline(
        "scoring",
        [
            mds.Node.function("features", features),
            mds.Node.fan_out("both", ["model", "half"], join=join),
            mds.Node.model("model", Steps),
            mds.Node.function("half", lambda x: x / 2),
        ],
    )
    runtime = mds.Runtime()
    runtime.add_pipeline(pipeline)
    async with runtime:
        with spans.tracer.start_as_current_span("caller") as caller:
            assert await runtime.serve("scoring", {"amount": 4}) == 10.0
    top = spans.one("mds.pipeline scoring")
    assert top.parent is not None and top.parent.span_id == caller.get_span_context().span_id
    assert dict(top.attributes or {})["mds.pipeline.name"] == "scoring"
    nodes = spans.children(top)
    assert sorted(nodes) == ["mds.node both", "mds.node features"]
    assert dict(nodes["mds.node both"].attributes or {})["mds.node.kind"] == "fan_out"
    branches = spans.children(nodes["mds.node both"])
    assert sorted(branches) == ["mds.node half", "mds.node model"]
    request = spans.one("mds.serve scoring.model")
    assert request.parent is not None
    assert request.parent.span_id == branches["mds.node model"].context.span_id
    assert {s.context.trace_id for s in spans.all() if s.name != "mds.infer scoring.model"} == {
        caller.get_span_context().trace_id
    }


async def test_a_failing_pipeline_node_marks_its_spans(spans: Spans) -> None:
    def broken(value: Any) -> Any:
        raise ValueError("no features")

    runtime = mds.Runtime()
    runtime.add_pipeline(mds.Pipeline("p", [mds.Node.function("broken", broken)]))
    async with runtime:
        with pytest.raises(mds.InferenceError):
            await runtime.serve("p", 1)
    for name in ("mds.pipeline p", "mds.node broken"):
        span = spans.one(name)
        assert span.status.status_code is trace.StatusCode.ERROR
        assert dict(span.attributes or {})["error.type"] == "mds.InferenceError"


async def test_a_stream_is_one_span_until_it_ends(spans: Spans) -> None:
    class Words(mds.ModelHandler[str, str]):
        def infer(self, batch: Sequence[str]) -> list[str]:
            return list(batch)

        async def postprocess(self, output: str) -> Any:
            for word in output.split():
                yield word

    async with mds.ModelRuntime(Words()) as model:
        chunks = [chunk async for chunk in model.stream("a b c")]
    assert chunks == ["a", "b", "c"]
    request = spans.one("mds.serve Words")
    assert request.status.status_code is trace.StatusCode.UNSET
    assert sorted(spans.children(request)) == ["mds.queue"]


async def test_the_request_id_is_an_attribute(spans: Spans) -> None:
    async with mds.ModelRuntime(Steps(), name="double") as model:
        with _logs.request_id("req-42"):
            await model.serve(1.0)
    assert dict(spans.one("mds.serve double").attributes or {})["mds.request.id"] == "req-42"


async def test_continued_makes_the_http_callers_span_the_parent(spans: Spans) -> None:
    headers = {"Traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01", "content-type": "application/json"}
    async with mds.ModelRuntime(Steps(), name="double") as model:
        with _tracing.continued(headers):
            await model.serve(1.0)
        with _tracing.continued(headers, server_span="POST /v2/models/double/infer"):
            await model.serve(2.0)
    first, second = sorted(spans.named("mds.serve double"), key=lambda s: s.start_time or 0)
    assert format(first.context.trace_id, "032x") == TRACE_ID
    assert first.parent is not None and format(first.parent.span_id, "016x") == SPAN_ID
    server = spans.one("POST /v2/models/double/infer")
    assert server.kind is trace.SpanKind.SERVER
    assert server.parent is not None and format(server.parent.span_id, "016x") == SPAN_ID
    assert second.parent is not None and second.parent.span_id == server.context.span_id


async def test_continued_keeps_a_span_the_host_already_made(spans: Spans) -> None:
    headers = {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01"}
    async with mds.ModelRuntime(Steps(), name="double") as model:
        with spans.tracer.start_as_current_span("host's server span") as host:
            with _tracing.continued(headers):
                await model.serve(1.0)
    request = spans.one("mds.serve double")
    assert request.parent is not None
    assert request.parent.span_id == host.get_span_context().span_id


@pytest.fixture
def unused() -> Iterator[Spans]:
    """A provider of the test's own that mds is not told of."""
    recorded = Spans()
    try:
        yield recorded
    finally:
        recorded.provider.shutdown()


async def test_a_provider_set_later_is_used_from_the_next_batch(
    monkeypatch: pytest.MonkeyPatch,
    doubler: type[mds.ModelHandler[float, float]],
    unused: Spans,
) -> None:
    _tracing.use(None)
    if _tracing.active is not None:
        pytest.skip("a global tracer provider is set in this process")
    recorded = unused
    try:
        async with mds.ModelRuntime(doubler) as model:
            await model.serve(1.0)
            assert recorded.all() == []
            # What trace.set_tracer_provider does, undone after the test.
            monkeypatch.setattr(trace, "_TRACER_PROVIDER", recorded.provider)
            await model.serve(2.0)  # not traced: its batch finds the provider
            await model.serve(3.0)
        assert len(recorded.named("mds.serve Doubler")) == 1
        assert len(recorded.named("mds.infer Doubler")) >= 1
    finally:
        monkeypatch.undo()
        _tracing.use(None)


async def test_without_an_sdk_nothing_is_made_per_request(
    monkeypatch: pytest.MonkeyPatch, doubler: type[mds.ModelHandler[float, float]]
) -> None:
    _tracing.use(trace.NoOpTracerProvider())  # as the API's default: records nothing
    try:
        assert _tracing.active is None

        def no_span(*args: Any) -> None:
            raise AssertionError("a span was made with no SDK")

        monkeypatch.setattr(_tracing, "RequestSpan", no_span)
        monkeypatch.setattr(_tracing, "record_batch", no_span)
        monkeypatch.setattr(_tracing, "current_span", no_span)
        async with mds.ModelRuntime(doubler) as model:
            assert await model.serve(1.0) == 2.0
            assert await model.serve(1.0, trace=True)
        runtime = mds.Runtime()
        runtime.add_pipeline(mds.Pipeline("p", [mds.Node.function("f", lambda x: x + 1)]))
        async with runtime:
            assert await runtime.serve("p", 1) == 2
        with _tracing.continued({"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01"}):
            pass
    finally:
        _tracing.use(None)


def test_the_api_default_provider_means_no_tracing() -> None:
    _tracing.use(None)
    if trace._TRACER_PROVIDER is not None:  # set by another test module of this process
        pytest.skip("a global tracer provider is set in this process")
    assert _tracing.refresh() is None
