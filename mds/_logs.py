"""Logging an operator can use: named loggers, structured fields, request ids, rate limits.

mds logs under one hierarchy, ``mds``, and installs no handler: the host
decides what is shown and how. Each part logs to a plain public name:

=================  ==========================================================
``mds.model``      a model's lifecycle, and its requests' failures
``mds.batching``   the batcher: out of device memory, batch isolation
``mds.pipeline``   pipelines: a function node's or a join's failures
``mds.runtime``    the runtime: versions, on-demand loads, start and stop
``mds.devices``    device discovery and placement, failed devices
``mds.backends``   the ONNX, TorchScript and TensorFlow handlers
``mds.repository`` the model repository and its watch
``mds.http``       the HTTP adapters
``mds.grpc``       the gRPC service
``mds.workers``    queue workers: dead letters, releases, a failing broker
=================  ==========================================================

Records from the request and batch paths carry fields for the host's
formatter (``extra=``), named so they cannot clash with the record's own
attributes: see :data:`FIELDS`.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "FIELDS",
    "Failures",
    "RateLimit",
    "current_request_id",
    "fields",
    "request_id",
]

#: The fields mds puts on its records, each where it is known (so that a
#: formatter's ``defaults`` fill in the rest), by name:
#: the model's name and version, the pipeline's name, the batch's per-model
#: number, the request id the caller set (:func:`request_id`), and the trace
#: and span ids of the current OpenTelemetry span (32 and 16 hex digits).
FIELDS = (
    "mds_model",
    "mds_version",
    "mds_pipeline",
    "mds_batch",
    "mds_request_id",
    "mds_trace_id",
    "mds_span_id",
)

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mds_request_id", default=None
)


@contextmanager
def request_id(value: str | None) -> Iterator[None]:
    """Name the requests served inside the block ``value``, for logs and spans.

    A transport sets it from the request's ``X-Request-Id`` header or the
    protocol's ``id``. It follows the request into mds's event loop, from
    any thread or loop. ``None`` leaves the current one as it is.
    """
    if value is None:
        yield
        return
    token = _request_id.set(value)
    try:
        yield
    finally:
        _request_id.reset(token)


def current_request_id() -> str | None:
    """The id :func:`request_id` set for this request, if any."""
    return _request_id.get()


def fields(
    model: str | None = None,
    version: str | None = None,
    batch: int | None = None,
    *,
    pipeline: str | None = None,
) -> dict[str, Any]:
    """The ``extra=`` for a record about ``model`` (or ``pipeline``): the known :data:`FIELDS`.

    The request id and the trace ids are those of the current context (the
    request's, in its own task).
    """
    trace_id, span_id = _trace_ids()
    found = {
        "mds_model": model,
        "mds_version": version,
        "mds_pipeline": pipeline,
        "mds_batch": batch,
        "mds_request_id": _request_id.get(),
        "mds_trace_id": trace_id,
        "mds_span_id": span_id,
    }
    return {key: value for key, value in found.items() if value is not None}


def _trace_ids() -> tuple[str | None, str | None]:
    """The current span's trace and span ids, if OpenTelemetry is in use."""
    api = sys.modules.get("opentelemetry.trace")  # never imported here: only if the host did
    if api is None:
        return None, None
    try:
        context = api.get_current_span().get_span_context()
    except Exception:  # pragma: no cover - an API we do not know; logs go on without ids
        return None, None
    if not context.is_valid:
        return None, None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class RateLimit:
    """At most ``limit`` events per ``interval`` seconds; the rest are counted.

    Windows are fixed: the first event after a window ends opens the next.
    Not thread-safe: one event loop's code uses each.

    Args:
        limit: events let through per window.
        interval: the window's length in seconds.
        clock: seconds from a monotonic clock. Real time, not the event
            loop's: it is about how much an operator reads.
    """

    __slots__ = ("_clock", "_count", "_opened", "interval", "limit", "suppressed")

    def __init__(
        self, limit: int = 10, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.interval = interval
        self._clock = clock
        self._opened = -float("inf")
        self._count = 0
        #: Events held back since the last one let through.
        self.suppressed = 0

    def admit(self) -> int | None:
        """``None`` if this event is over the limit (counted); else how many were held back.

        A number is what the caller reports before this event, then forgets.
        """
        now = self._clock()
        if now - self._opened >= self.interval:
            self._opened = now
            self._count = 0
        if self._count >= self.limit:
            self.suppressed += 1
            return None
        self._count += 1
        held, self.suppressed = self.suppressed, 0
        return held

    def take_suppressed(self) -> int:
        """How many were held back since the last event let through; then zero."""
        held, self.suppressed = self.suppressed, 0
        return held


class Failures:
    """Where one model's (or pipeline's) failed requests are reported to the operator.

    Each failure of user code (``infer``, ``postprocess``, a pipeline
    function) is one WARNING line with its cause and the record's fields;
    its traceback goes to DEBUG. Past ``limit`` lines in ``interval``
    seconds the rest are counted, and one line says how many when the next
    is let through, or at :meth:`flush` (when the model stops).

    Args:
        logger: where the lines go.
        model: the model's name, for the fields and the lines.
        version: its version, for the fields and the lines.
        pipeline: the pipeline's name, instead of a model's.
        limit: see :class:`RateLimit`.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        model: str | None = None,
        version: str | None = None,
        pipeline: str | None = None,
        limit: RateLimit | None = None,
    ) -> None:
        self.logger = logger
        self.where = (
            f"pipeline {pipeline!r}" if model is None else f"model {model!r} (version {version})"
        )
        self.model = model
        self.version = version
        self.pipeline = pipeline
        self.limit = limit if limit is not None else RateLimit()

    def report(self, exc: BaseException, batch: int | None = None) -> None:
        """Log a request's failure ``exc`` (its message says where and why)."""
        logger = self.logger
        if not logger.isEnabledFor(logging.WARNING):
            return
        extra = fields(self.model, self.version, batch, pipeline=self.pipeline)
        held = self.limit.admit()
        if held is not None:
            if held:
                self._held(held, extra)
            about = [f"batch {batch}"] if batch is not None else []
            if "mds_request_id" in extra:
                about.append(f"request id {extra['mds_request_id']}")
            logger.warning(
                "request failed: %s: %s%s",
                type(exc).__name__,
                exc,
                f" ({', '.join(about)})" if about else "",
                extra=extra,
            )
        if logger.isEnabledFor(logging.DEBUG):
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            logger.debug(
                "%s: the request's failure, traced", self.where, exc_info=cause, extra=extra
            )

    def flush(self) -> None:
        """Report the failures held back since the last line, if any."""
        held = self.limit.take_suppressed()
        if held:
            self._held(held, fields(self.model, self.version, pipeline=self.pipeline))

    def _held(self, held: int, extra: dict[str, Any]) -> None:
        limit = self.limit
        self.logger.warning(
            "%s: %d more failed requests were not logged (at most %d are logged per %g s)",
            self.where,
            held,
            limit.limit,
            limit.interval,
            extra=extra,
        )
