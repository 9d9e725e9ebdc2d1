"""OpenTelemetry spans for requests, batches and pipelines; nothing at all without an SDK.

mds depends on no OpenTelemetry package and never imports one first: it
uses the API the host app imported. Once the host has configured an SDK
(``trace.set_tracer_provider(...)``, or ``opentelemetry-instrument``), mds
records:

- ``mds.serve {model}``: one request, a child of the caller's current span
  (from whatever thread or event loop it called: the call carries its
  context into mds's loop), with ``mds.preprocess``, ``mds.queue`` and
  ``mds.postprocess`` children, recorded with their exact times once known;
- ``mds.infer {model}``: one batch, the root of its own trace, linked to the
  spans of the requests it computed;
- ``mds.pipeline {name}`` and ``mds.node {node}``: a pipeline request and
  its nodes; a model node's ``mds.serve`` nests in its node's span.

The request path reads :data:`active` once per request and does nothing
more while it is ``None``. :func:`refresh` decides it from the configured
provider: at each model start, each batch and each pipeline request, so a
provider set after mds started is used from the next batch on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import anyio

from . import _logs
from ._version import __version__

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "RequestSpan",
    "active",
    "continued",
    "current_span",
    "record_batch",
    "refresh",
    "serve_in_span",
    "site",
    "spanned",
    "use",
]

#: The tracer while a real (SDK) tracer provider is configured; else ``None``.
active: Tracer | None = None

_UNSEEN: Any = object()
_seen: Any = _UNSEEN  # the provider that ``active`` was decided for
_given: TracerProvider | None = None  # see use()
# The parts of the API used once a real provider is seen (imported by then).
_trace: Any = None
_context: Any = None
_propagate: Any = None


def refresh() -> Tracer | None:
    """:data:`active`, decided again if the configured provider changed; cheap."""
    global active, _seen
    provider: Any = _given
    if provider is None:
        api = sys.modules.get("opentelemetry.trace")
        if api is not None:
            # What the API's own proxy tracers read: get_tracer_provider()
            # would read os.environ too, each time.
            provider = getattr(api, "_TRACER_PROVIDER", _UNSEEN)
            if provider is _UNSEEN:  # pragma: no cover - a later API without it
                provider = api.get_tracer_provider()
    if provider is _seen:
        return active
    _seen = provider
    active = _tracer_of(provider)
    return active


def use(provider: TracerProvider | None) -> None:
    """Trace with ``provider`` instead of the global one (``None``: the global again).

    For tests: the global provider can be set only once per process.
    """
    global _given, _seen
    _given = provider
    _seen = _UNSEEN
    refresh()


def _tracer_of(provider: Any) -> Tracer | None:
    """The tracer ``provider`` gives mds, or ``None`` if it records nothing."""
    global _trace, _context, _propagate
    if provider is None:
        return None
    from opentelemetry import context, propagate, trace

    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    tracer: Tracer = provider.get_tracer("mds", __version__)
    if isinstance(tracer, (trace.NoOpTracer, trace.ProxyTracer)):
        return None  # an SDK that is turned off (OTEL_SDK_DISABLED)
    _trace, _context, _propagate = trace, context, propagate
    return tracer


# -- one request -------------------------------------------------------------


class RequestSpan:
    """One request's span, current in the request's task while it is served.

    The request path tells it the request's queued item (:attr:`item`),
    whose batch says where and when it was computed.
    """

    __slots__ = ("_token", "item", "span", "tracer")

    def __init__(self, tracer: Tracer, name: str, attributes: dict[str, Any]) -> None:
        self.tracer = tracer
        request_id = _logs.current_request_id()
        if request_id is not None:
            attributes["mds.request.id"] = request_id
        self.span: Span = tracer.start_span(name, attributes=attributes)
        self._token: Any = _context.attach(_trace.set_span_in_context(self.span))
        self.item: Any = None

    def detach(self) -> None:
        """It is no longer the current span of this task."""
        token, self._token = self._token, None
        if token is not None:
            _context.detach(token)

    def link(self) -> Any:
        """What a batch's span links to."""
        return self.span.get_span_context()

    def served(self, trace: Any, now: float, preprocess: bool, postprocess: bool) -> None:
        """End it: the request was answered, as ``trace`` (a ``CallTrace``) says.

        ``now``: the loop's clock, just after the answer.
        """
        if not self.span.is_recording():  # sampled out: its children would be too
            self.span.end()
            return
        offset = _offset(now)
        item = self.item
        if preprocess and item is not None:
            self._child(
                "mds.preprocess", item.enqueued - trace.preprocess_seconds, item.enqueued, offset
            )
        self._batch(offset)
        if postprocess:
            self._child("mds.postprocess", now - trace.postprocess_seconds, now, offset)
        self.span.end()

    def failed(self, exc: BaseException, now: float) -> None:
        """End it: the request failed with ``exc`` (or was cancelled)."""
        self._batch(_offset(now))
        set_error(self.span, exc)
        self.span.end()

    async def chunks(self, chunks: AsyncIterator[Any], now: float) -> AsyncIterator[Any]:
        """``chunks``, the request's stream; it ends when the stream does."""
        self._batch(_offset(now))
        try:
            async for chunk in chunks:
                yield chunk
        except BaseException as exc:
            set_error(self.span, exc)
            raise
        finally:
            try:
                close = getattr(chunks, "aclose", None)
                if close is not None:
                    await close()
            finally:
                self.span.end()

    def _batch(self, offset: int) -> None:
        """Its batch's attributes and its ``mds.queue`` child, once it had a batch."""
        item = self.item
        info = item.batch if item is not None else None
        if info is None or not self.span.is_recording():
            return
        self._child("mds.queue", item.enqueued, info.started, offset)
        self.span.set_attributes(
            {
                "mds.batch.id": info.id,
                "mds.batch.size": info.size,
                "mds.queue.wait": info.started - item.enqueued,
                "mds.instance": info.instance,
                "mds.device": str(info.device),
            }
        )

    def _child(self, name: str, start: float, end: float, offset: int) -> None:
        child = self.tracer.start_span(
            name,
            context=_trace.set_span_in_context(self.span),
            start_time=offset + int(start * 1e9),
        )
        child.end(end_time=offset + int(end * 1e9))


def site(name: str, model: str, version: str) -> tuple[str, dict[str, Any]]:
    """A model's request span: its name and its first attributes."""
    return name, {"mds.model.name": model, "mds.model.version": version}


async def serve_in_span(
    tracer: Tracer,
    serve: Callable[..., Awaitable[Any]],
    call: tuple[Any, ...],
    site: tuple[str, dict[str, Any]],
    clock: Callable[[], float],
    preprocess: bool,
    postprocess: bool,
) -> Any:
    """``serve(*call)`` (a model's request path) in a request span of its own.

    ``call`` is ``(request, timeout, priority, trace, stream)``; ``serve`` is
    called with ``trace`` set, for the steps' times, and the span, to tell
    the request's item to. ``site``: see :func:`site`. ``preprocess`` and
    ``postprocess``: whether the model has those steps (each gets a span).
    """
    request, timeout, priority, trace, stream = call
    span = RequestSpan(tracer, site[0], dict(site[1]))
    try:
        outcome = await serve(request, timeout, priority, True, stream, span)
    except BaseException as exc:
        span.detach()
        span.failed(exc, clock())
        raise
    span.detach()
    if stream:
        return span.chunks(outcome, clock())
    span.served(outcome.trace, clock(), preprocess, postprocess)
    return outcome if trace else outcome.value


# -- one batch -------------------------------------------------------------------


def record_batch(
    tracer: Tracer,
    model: str,
    version: str,
    info: Any,
    items: list[Any],
    outcomes: list[Any],
    now: float,
) -> None:
    """The span of a batch that was computed, as ``info`` says; ``now``: the loop's clock.

    A root span, linked to the spans of its requests (``item.span``).
    """
    offset = _offset(now)
    links = []
    seen: set[int] = set()
    for item in items:
        span = item.span
        if span is not None and id(span) not in seen:
            seen.add(id(span))
            links.append(_trace.Link(span.link()))
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    span = tracer.start_span(
        f"mds.infer {model}",
        context=_context.Context(),  # not the worker task's: each batch is a trace of its own
        links=links,
        start_time=offset + int(info.started * 1e9),
        attributes={
            "mds.model.name": model,
            "mds.model.version": version,
            "mds.batch.id": info.id,
            "mds.batch.size": info.size,
            "mds.batch.cost": info.cost,
            "mds.batch.failed": len(failures),
            "mds.instance": info.instance,
            "mds.device": str(info.device),
        },
    )
    if failures and len(failures) == len(outcomes):
        set_error(span, failures[0])
    span.end(end_time=offset + int((info.started + info.infer_seconds) * 1e9))


# -- pipelines, adapters ------------------------------------------------------


def spanned(
    tracer: Tracer | None, name: str, attributes: dict[str, Any]
) -> AbstractContextManager[Any]:
    """:func:`current_span`, or nothing at all without ``tracer``."""
    return _NO_SPAN if tracer is None else current_span(tracer, name, attributes)


_NO_SPAN = nullcontext()


@contextmanager
def current_span(
    tracer: Tracer, name: str, attributes: dict[str, Any], *, server: bool = False
) -> Iterator[Span]:
    """A span, current in this task inside the block; an error leaving it is recorded.

    Of kind INTERNAL, or SERVER with ``server``.

    With the caller's request id (:func:`mds._logs.request_id`) as ``mds.request.id``.
    """
    request_id = _logs.current_request_id()
    if request_id is not None:
        attributes = {**attributes, "mds.request.id": request_id}
    kind = _trace.SpanKind.SERVER if server else _trace.SpanKind.INTERNAL
    span = tracer.start_span(name, kind=kind, attributes=attributes)
    token = _context.attach(_trace.set_span_in_context(span))
    try:
        yield span
    except BaseException as exc:
        set_error(span, exc)
        raise
    finally:
        _context.detach(token)
        span.end()


@contextmanager
def continued(
    headers: Mapping[str, str],
    *,
    server_span: str | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """Serve inside the block as part of the trace the HTTP caller sent; for adapters.

    Where the current context already holds a span (the host's own
    instrumentation made the server span), that is kept and ``headers`` are
    not read. Otherwise the W3C ``traceparent`` and ``tracestate`` in
    ``headers`` (read with the global propagator, names in any case)
    become the parent, and with ``server_span`` a span of kind SERVER by
    that name is current inside. Does nothing without an SDK.

    Example:
        >>> with _tracing.continued(request.headers, server_span="POST /v2/models/{name}/infer"):
        ...     response = await target.serve(value)
    """
    tracer = refresh()
    if tracer is None:
        yield
        return
    if _trace.get_current_span().get_span_context().is_valid:
        # The host's instrumentation made the server span: it is the parent
        # as it is (a SERVER span inside a SERVER span would be wrong).
        yield
        return
    lowered = {key.lower(): value for key, value in headers.items()}
    token = _context.attach(_propagate.extract(lowered))
    try:
        if server_span is None:
            yield
        else:
            with current_span(tracer, server_span, dict(attributes or {}), server=True):
                yield
    finally:
        _context.detach(token)


# -- helpers -------------------------------------------------------------------


def set_error(span: Span, exc: BaseException) -> None:
    """Mark ``span`` failed: ``error.type`` and an ERROR status."""
    cls = type(exc)
    if _cancelled(exc):
        kind, description = "cancelled", "cancelled: the caller stopped waiting"
    elif cls.__module__ == "builtins":
        kind, description = cls.__qualname__, f"{cls.__qualname__}: {exc}"
    else:
        kind, description = f"{cls.__module__}.{cls.__qualname__}", f"{cls.__name__}: {exc}"
    span.set_attribute("error.type", kind)
    span.set_status(_trace.Status(_trace.StatusCode.ERROR, description))


def _cancelled(exc: BaseException) -> bool:
    if isinstance(exc, GeneratorExit):
        return True
    try:
        return isinstance(exc, anyio.get_cancelled_exc_class())
    except Exception:  # not in an event loop (a sync adapter's thread)
        return False


def _offset(now: float) -> int:
    """Nanoseconds to add to a time of the loop's clock (``now``: it now) for the epoch's.

    Spans take wall-clock times; mds measures with the loop's monotonic clock.
    """
    return time.time_ns() - int(now * 1e9)
