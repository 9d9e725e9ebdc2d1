"""What the HTTP adapters share: routes' meaning, bodies, errors; no framework.

Each adapter reads the request its framework's way, calls these to decode it,
awaits (or blocks on) the runtime, and calls these again to make the reply.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import numpy as np

from .._deps import require
from .._errors import (
    DeadlineExceeded,
    DecodeError,
    InferenceError,
    InvalidInput,
    MdsError,
    ModelNotFound,
    Overloaded,
    RequestError,
    Unavailable,
    excerpt,
)
from .._oip import call as v2_protocol
from .._oip import protocol, reports
from .._oip.call import V2Call
from .._oip.protocol import ModelMetadata
from .._request import EMPTY_CONTEXT, RequestContext, use_request_context
from .._runtime import Runtime
from .._servable import Servable
from .._stateful import in_sequence
from .._status import ModelHealth, PipelineHealth, RuntimeHealth
from .._version import __version__

__all__ = [
    "ERROR_STATUS",
    "METRICS_ROUTES",
    "ROUTES",
    "STATUS_ROUTES",
    "V2_ROUTES",
    "Call",
    "Reply",
    "Service",
    "V2Call",
    "allowed",
    "error_reply",
    "error_status",
    "paths",
    "request_id",
    "span_name",
]

logger = logging.getLogger("mds.http")

JSON = "application/json"
#: The headers that make a request to mds's JSON route a step of a sequence.
SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END = (
    "mds-sequence-id",
    "mds-sequence-start",
    "mds-sequence-end",
)
BINARY_HEADER = protocol.BINARY_HEADER.lower()
EVENT_STREAM = "text/event-stream"
#: The reply header that names the version that answered a JSON request.
VERSION_HEADER = "Mds-Model-Version"

#: Error class -> HTTP status, most specific first: the one table both adapters use.
ERROR_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (ModelNotFound, 404),
    (RequestError, 400),  # DecodeError, InvalidInput
    (Overloaded, 429),
    (Unavailable, 503),  # NotReady
    (DeadlineExceeded, 504),
    (InferenceError, 500),
    (MdsError, 500),
)


#: The protocol extensions the routes serve (``model_repository`` too, with a repository).
EXTENSIONS = ("binary_tensor_data", *reports.EXTENSIONS)

#: The most characters of an error message a reply carries.
MAX_MESSAGE = 2000
#: The most characters of a request id kept for logs and traces.
MAX_REQUEST_ID = 128


def error_status(exc: BaseException) -> int | None:
    """The HTTP status for ``exc`` by :data:`ERROR_STATUS`; ``None`` if it is not mds's."""
    return next((code for kind, code in ERROR_STATUS if isinstance(exc, kind)), None)


def error_reply(exc: BaseException, retry_after: int = 1) -> Reply:
    """The reply for a failed request: status by :data:`ERROR_STATUS`, JSON body.

    The body is ``{"error": message, "type": class, ...where}``: where it
    happened (``model``, ``version``, ``pipeline``, ``node``, ``instance``)
    as fields too. The message is bounded: an error that quotes a huge input
    sends its start and its size. A 429 or 503 says when to try again
    (``Retry-After``). An error that is not mds's is a bug: the client gets
    a bare 500, the log the whole story.
    """
    status = error_status(exc)
    if status is None:
        logger.error("unexpected error while serving a request", exc_info=exc)
        return Reply(500, _encoder.encode({"error": "internal server error", "type": "Error"}))
    assert isinstance(exc, MdsError)
    headers = (("Retry-After", str(retry_after)),) if isinstance(exc, Unavailable) else ()
    body = {"error": excerpt(str(exc), MAX_MESSAGE), "type": type(exc).__name__}
    return Reply(status, _encoder.encode({**body, **exc.context()}), JSON, headers)


#: (method, path, route) for every route both adapters add; ``route`` names
#: the adapter's method that answers it. Paths use ``{param}`` placeholders.
ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/health/live", "live"),
    ("GET", "/health/ready", "ready"),
    ("GET", "/models", "models"),
    ("GET", "/models/{name}", "metadata"),
    ("GET", "/models/{name}/ready", "model_ready"),
    ("POST", "/models/{name}/infer", "infer"),
    ("POST", "/models/{name}/versions/{version}/infer", "infer"),
    ("GET", "/statistics", "statistics"),
)
#: The Open Inference Protocol's routes.
V2_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/v2/health/live", "live"),
    ("GET", "/v2/health/ready", "ready"),
    ("GET", "/v2", "server_metadata"),
    # Before /v2/models/{name}: "stats" is no model's name here (as in Triton).
    ("GET", "/v2/models/stats", "stats"),
    ("GET", "/v2/models/{name}", "metadata"),
    ("GET", "/v2/models/{name}/versions/{version}", "metadata"),
    ("GET", "/v2/models/{name}/ready", "v2_ready"),
    ("GET", "/v2/models/{name}/versions/{version}/ready", "v2_ready"),
    ("POST", "/v2/models/{name}/infer", "v2_infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer", "v2_infer"),
    ("GET", "/v2/models/{name}/stats", "stats"),
    ("GET", "/v2/models/{name}/versions/{version}/stats", "stats"),
    ("GET", "/v2/models/{name}/config", "config"),
    ("GET", "/v2/models/{name}/versions/{version}/config", "config"),
)


#: Prometheus' scrape route, with ``metrics=``.
METRICS_ROUTES: tuple[tuple[str, str, str], ...] = (("GET", "/metrics", "metrics"),)
#: The status page and the data it reads, with ``status_page=True``.
STATUS_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/status", "status_page"),
    ("GET", "/status/data", "status_data"),
)


def paths(
    v2: bool, *, metrics: bool = False, status_page: bool = False
) -> dict[str, dict[str, str]]:
    """Each path the adapters add, with the route that answers each of its methods.

    An adapter registers each path once and dispatches by method itself, so
    that a method a path does not take gets mds's own 405 (see
    :meth:`Service.not_allowed`).
    """
    found: dict[str, dict[str, str]] = {}
    routes = (
        ROUTES
        + (V2_ROUTES if v2 else ())
        + (METRICS_ROUTES if metrics else ())
        + (STATUS_ROUTES if status_page else ())
    )
    for method, path, route in routes:
        found.setdefault(path, {})[method] = route
    return found


def span_name(v2: bool, versioned: bool) -> str:
    """The server span's name for an infer call: its method and route (low cardinality)."""
    version = "/versions/{version}" if versioned else ""
    return f"POST {'/v2' if v2 else ''}/models/{{name}}{version}/infer"


def request_id(call: Call, header: str | None) -> str | None:
    """The request's id for logs and traces: ``X-Request-Id``, else the protocol's ``id``."""
    found = header or (call.v2.request.id if call.v2 is not None else None)
    # Bounded: it goes on every log record and span of the request.
    return found[:MAX_REQUEST_ID] if found else None


def metrics_registry(runtime: Runtime, metrics: Any) -> Any:
    """The registry ``/metrics`` serves (``None``: no such route).

    ``metrics=True`` makes one holding ``runtime``'s collector; a registry
    given is served as it is.
    """
    if metrics is None or metrics is False:
        return None
    if metrics is True:
        core = require("prometheus_client", feature="the adapters' metrics=True")
        from ..prometheus import Collector

        registry = core.CollectorRegistry(auto_describe=True)
        registry.register(Collector(runtime))
        return registry
    if not callable(getattr(metrics, "collect", None)):
        raise TypeError(
            f"metrics= takes True or a prometheus_client CollectorRegistry, "
            f"not {type(metrics).__name__}"
        )
    return metrics


def make_service(runtime: Runtime, *, repository: bool, metrics: Any, **settings: Any) -> Service:
    """The :class:`Service` for an adapter's options.

    ``repository``: the repository routes are served (the server metadata
    lists the extension); ``metrics``: as :func:`metrics_registry` takes it.
    ``settings``: the other fields of :class:`Service`.
    """
    extensions = (*EXTENSIONS, "model_repository") if repository else EXTENSIONS
    registry = metrics_registry(runtime, metrics)
    return Service(runtime, extensions=extensions, metrics=registry, **settings)


def allowed(methods: Iterable[str]) -> tuple[str, ...]:
    """What ``Allow`` lists for a path that answers ``methods``."""
    return tuple(sorted({*methods, *(("HEAD",) if "GET" in methods else ()), "OPTIONS"}))


class Reply(NamedTuple):
    """An HTTP response, framework-neutral."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


class Call(NamedTuple):
    """One decoded inference request, from either route family.

    Serve ``payload`` with ``target``, or each of ``rows`` at once when it is
    not ``None`` (a protocol request with a batch axis), and make the reply
    with :meth:`Service.reply`.
    """

    target: Servable
    payload: Any
    rows: list[Any] | None
    timeout: float | None
    priority: int | None
    streams: bool  # answer with server-sent events
    v2: V2Call | None = None
    #: What the handler may read of the request (``mds.request_context()``).
    context: RequestContext = EMPTY_CONTEXT


def _enc_hook(value: Any) -> Any:
    """JSON for what handlers commonly return beyond plain Python values."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if hasattr(value, "detach") and hasattr(value, "tolist"):  # a torch tensor
        return value.detach().cpu().tolist()
    raise NotImplementedError(f"cannot encode {type(value).__name__} as JSON")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)
_decoder = msgspec.json.Decoder()


@dataclass(frozen=True)
class Service:
    """The routes' behaviour for one runtime.

    Attributes:
        runtime: the runtime whose models and pipelines are served.
        timeout_header: the request header that carries a deadline, in seconds.
        priority_header: the request header that carries a priority level.
        max_body_bytes: a larger request body is refused with a 400.
        retry_after: seconds a client is told to wait (``Retry-After``) when
            a model is overloaded or not ready.
        extensions: the protocol extensions the server metadata lists.
        metrics: the ``prometheus_client`` registry ``/metrics`` serves, if any.
        peers: the other worker processes of one server that are not ready
            yet (their process ids), where readiness adds up across workers.
    """

    runtime: Runtime
    timeout_header: str = "Mds-Timeout"
    priority_header: str = "Mds-Priority"
    max_body_bytes: int = 64 * 1024 * 1024
    retry_after: int = 1
    extensions: tuple[str, ...] = EXTENSIONS
    metrics: Any = None
    peers: Callable[[], list[str]] | None = None
    _retry: tuple[tuple[str, str], ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_retry", (("Retry-After", str(self.retry_after)),))

    # -- errors -------------------------------------------------------------

    def error(self, exc: BaseException) -> Reply:
        """The reply for a failed request: see :func:`error_reply`."""
        return error_reply(exc, self.retry_after)

    def not_allowed(self, method: str, methods: tuple[str, ...]) -> Reply:
        """The answer to a method a path does not take (``methods``, from :func:`allowed`).

        ``OPTIONS`` gets a 200; any other, a 405 in mds's error shape. Both
        carry ``Allow``.
        """
        headers = (("Allow", ", ".join(methods)),)
        if method == "OPTIONS":
            return Reply(200, b"", "text/plain", headers)
        message = (
            f"{excerpt(method, 20)} is not allowed here; this route takes {', '.join(methods)}"
        )
        body = _encoder.encode({"error": message, "type": "MethodNotAllowed"})
        return Reply(405, body, JSON, headers)

    def too_large(self, size: int) -> DecodeError:
        return DecodeError(
            f"the request body is {size} bytes; this server takes at most "
            f"{self.max_body_bytes} (max_body_bytes)"
        )

    def limits(self, headers: Mapping[str, str]) -> tuple[float | None, int | None]:
        """The request's deadline (seconds) and priority from its headers."""
        timeout: float | None = None
        priority: int | None = None
        raw = headers.get(self.timeout_header)
        if raw is not None:
            try:
                timeout = float(raw)
            except ValueError:
                timeout = math.nan
            if not (timeout > 0 and math.isfinite(timeout)):
                raise DecodeError(
                    f"header {self.timeout_header}: {raw!r} is not a positive number of seconds"
                )
        raw = headers.get(self.priority_header)
        if raw is not None:
            try:
                priority = int(raw)
            except ValueError:
                priority = -1
            if priority < 0:
                raise DecodeError(
                    f"header {self.priority_header}: {raw!r} is not a priority level (0, 1, ...)"
                )
        return timeout, priority

    # -- health and metadata ------------------------------------------------

    def live(self) -> Reply:
        live = self.runtime.running
        return Reply(200 if live else 503, _encoder.encode({"live": live}))

    def ready(self, health: RuntimeHealth) -> Reply:
        ready = health.ready  # every model; so every pipeline, made of them
        if ready and self.peers is not None:
            waiting = self.peers()
            if waiting:  # this worker is ready, but not the whole server
                health = msgspec.structs.replace(health, ready=False)
                ready = False
                headers = (*self._unless(False), ("Mds-Workers-Not-Ready", ", ".join(waiting)))
                return Reply(503, _encoder.encode(health), JSON, headers)
        return Reply(200 if ready else 503, _encoder.encode(health), JSON, self._unless(ready))

    def target(self, name: str, version: str | None = None) -> Servable:
        """The model or pipeline called ``name`` (at ``version``, if given)."""
        return self.runtime.servable(name, version)

    def model_ready(
        self, target: Servable, report: ModelHealth | PipelineHealth, v2: bool = False
    ) -> Reply:
        """One model's or pipeline's readiness, from its own ``health()``."""
        body = (
            {"name": target.name, "ready": report.ready}
            if v2
            else msgspec.to_builtins(report, enc_hook=_enc_hook)
        )
        return Reply(
            200 if report.ready else 503, _encoder.encode(body), JSON, self._unless(report.ready)
        )

    def _unless(self, ready: bool) -> tuple[tuple[str, str], ...]:
        return () if ready else self._retry

    def statistics(self) -> Reply:
        return Reply(200, _encoder.encode(self.runtime.statistics()))

    def metrics_reply(self, accept: str | None) -> Reply:
        """The metrics of :attr:`metrics` (a registry), as the scraper's ``Accept`` asks."""
        from ..prometheus import exposition

        body, content_type = exposition(self.metrics, accept)
        return Reply(200, body, content_type)

    def status_page(self) -> Reply:
        from . import status_page

        return Reply(200, status_page.PAGE, "text/html; charset=utf-8")

    def status_data(self) -> Reply:
        from . import status_page

        return Reply(200, status_page.data(self.runtime))

    def stats(self, name: str | None = None, version: str | None = None) -> Reply:
        """The statistics extension: every model's, or one model's (at one version)."""
        return Reply(200, _encoder.encode(reports.statistics(self.runtime, name, version)))

    def model_config(self, name: str, version: str | None = None) -> Reply:
        """Triton's model configuration of a model or pipeline."""
        return Reply(200, _encoder.encode(reports.model_config(self.runtime, name, version)))

    def server_metadata(self) -> Reply:
        meta = protocol.ServerMetadata(
            name="mds", version=__version__, extensions=list(self.extensions)
        )
        return Reply(200, _encoder.encode(meta))

    def model_metadata(self, name: str, version: str | None = None) -> Reply:
        return Reply(200, _encoder.encode(self.metadata(self.target(name, version))))

    def models(self) -> Reply:
        servables = self.runtime.servables.values()
        return Reply(200, _encoder.encode([self.metadata(target) for target in servables]))

    def metadata(self, target: Servable) -> ModelMetadata:
        return reports.metadata(target)

    # -- mds's own JSON inference -------------------------------------------

    def check_size(self, size: int | None) -> None:
        if size is not None and size > self.max_body_bytes:
            raise self.too_large(size)

    def json_request(self, body: bytes) -> Any:
        """The request a JSON body holds, as plain Python values."""
        self.check_size(len(body))
        try:
            return _decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise DecodeError(f"the request body is not valid JSON: {exc}") from None
        except RecursionError:
            raise DecodeError("the request body's JSON is nested too deeply") from None

    def json_reply(self, result: Any, version: str | None = None) -> Reply:
        headers = () if version is None else ((VERSION_HEADER, version),)
        return Reply(200, self.encode(result), JSON, headers)

    def encode(self, result: Any) -> bytes:
        try:
            return _encoder.encode(result)
        except (NotImplementedError, TypeError, ValueError) as exc:
            raise InferenceError(f"the model's response cannot be sent as JSON: {exc}") from exc

    def event(self, chunk: Any) -> bytes:
        """One server-sent event carrying ``chunk`` as JSON."""
        return b"data: " + self.encode(chunk) + b"\n\n"

    def error_event(self, exc: BaseException) -> bytes:
        """The event that ends a stream that failed midway."""
        return b"event: error\ndata: " + self.error(exc).body + b"\n\n"

    # -- the Open Inference Protocol ----------------------------------------

    def request(
        self,
        name: str,
        version: str | None,
        body: bytes,
        headers: Mapping[str, str],
        *,
        v2: bool,
    ) -> Call:
        """Decode an inference request: its payload, limits and whether it streams.

        ``headers`` must answer the names this service reads case-insensitively
        (or by their lower-case names).
        """
        timeout, priority = self.limits(headers)
        self.check_size(len(body))
        target = self.target(name, version).choose()
        v2_call: V2Call | None = None
        rows: list[Any] | None = None
        given_id = headers.get("x-request-id")
        try:
            if v2:
                v2_call = v2_protocol.decode(target, body, headers.get(BINARY_HEADER), given_id)
                payload, rows, context = v2_call.payload, v2_call.rows, v2_call.context
                # A header and a parameter may both set them: the earlier
                # deadline holds; the header's priority (mds's own levels) wins.
                if v2_call.timeout is not None and (timeout is None or v2_call.timeout < timeout):
                    timeout = v2_call.timeout
                if priority is None:
                    priority = v2_call.priority
            else:
                payload = self.json_request(body)
                context = RequestContext(id=given_id) if given_id else EMPTY_CONTEXT
                if any(name in headers for name in (SEQUENCE_ID, SEQUENCE_START, SEQUENCE_END)):
                    context = _sequence(target, headers, context)
        except MdsError as exc:
            target.add_context(exc)
            raise
        streams = target.streams or EVENT_STREAM in headers.get("accept", "")
        if streams and rows is not None:
            raise InvalidInput(
                "a model that streams takes one request at a time: send the tensors "
                "without a batch axis"
            )
        return Call(target, payload, rows, timeout, priority, streams, v2_call, context)

    def reply(self, call: Call, result: Any) -> Reply:
        """The response to ``call`` for the model's ``result`` (each row's, with rows)."""
        if call.v2 is None:
            return self.json_reply(result, call.target.version)
        try:
            body, head = v2_protocol.encode(call.v2, result)
        except MdsError as exc:
            call.v2.target.add_context(exc)
            raise
        if head is None:
            return Reply(200, body)
        return Reply(200, body, "application/octet-stream", ((protocol.BINARY_HEADER, str(head)),))

    def stream_event(self, call: Call, chunk: Any) -> bytes:
        """One server-sent event for one chunk of a stream (protocol responses in JSON)."""
        if call.v2 is None:
            return self.event(chunk)
        return b"data: " + v2_protocol.encode(call.v2, chunk, binary_ok=False)[0] + b"\n\n"


def _sequence(
    target: Servable, headers: Mapping[str, str], context: RequestContext
) -> RequestContext:
    """``context`` with the sequence the ``Mds-Sequence-*`` headers name.

    An id of digits is the integer id, so that it names the same sequence as
    the protocol's integer ``sequence_id``.
    """
    flags = []
    for name in (SEQUENCE_START, SEQUENCE_END):
        raw = headers.get(name, "false").strip().lower()
        if raw not in _FLAGS:
            raise DecodeError(f"header {name.title()}: {excerpt(raw, 20)!r} is not true or false")
        flags.append(_FLAGS[raw])
    raw_id = headers.get(SEQUENCE_ID)
    if raw_id is None and not any(flags):  # "false" flags alone: no sequence
        return context
    sequence_id: Any = int(raw_id) if raw_id is not None and raw_id.isdecimal() else raw_id
    with use_request_context(context):
        return in_sequence(target, sequence_id, flags[0], flags[1], "header Mds-Sequence-Id")


_FLAGS = {"true": True, "1": True, "false": False, "0": False}
