"""What the HTTP adapters share: routes' meaning, bodies, errors; no framework.

Each adapter reads the request its framework's way, calls these to decode it,
awaits (or blocks on) the runtime, and calls these again to make the reply.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import numpy as np

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
)
from .._runtime import Runtime
from .._servable import Servable
from .._status import RuntimeHealth
from .._tensors import TensorSpec
from .._version import __version__
from . import protocol
from .protocol import InferRequest, ModelMetadata, TensorMetadata

__all__ = ["ERROR_STATUS", "ROUTES", "V2_ROUTES", "Call", "Reply", "Service", "V2Call"]

logger = logging.getLogger("mds.http")

JSON = "application/json"
BINARY_HEADER = protocol.BINARY_HEADER.lower()
EVENT_STREAM = "text/event-stream"

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


#: (method, path, route) for every route both adapters add; ``route`` names
#: the adapter's method that answers it. Paths use ``{param}`` placeholders.
ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/health/live", "live"),
    ("GET", "/health/ready", "ready"),
    ("GET", "/models", "models"),
    ("GET", "/models/{name}", "metadata"),
    ("GET", "/models/{name}/ready", "model_ready"),
    ("POST", "/models/{name}/infer", "infer"),
    ("GET", "/statistics", "statistics"),
)
#: The Open Inference Protocol's routes.
V2_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/v2/health/live", "live"),
    ("GET", "/v2/health/ready", "ready"),
    ("GET", "/v2", "server_metadata"),
    ("GET", "/v2/models/{name}", "metadata"),
    ("GET", "/v2/models/{name}/versions/{version}", "metadata"),
    ("GET", "/v2/models/{name}/ready", "v2_ready"),
    ("GET", "/v2/models/{name}/versions/{version}/ready", "v2_ready"),
    ("POST", "/v2/models/{name}/infer", "v2_infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer", "v2_infer"),
)


class Reply(NamedTuple):
    """An HTTP response, framework-neutral."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()


class Call(NamedTuple):
    """One decoded inference request, from either route family."""

    name: str
    payload: Any
    timeout: float | None
    priority: int | None
    streams: bool  # answer with server-sent events
    v2: V2Call | None = None


class V2Call(NamedTuple):
    """A decoded Open Inference Protocol request, ready to serve."""

    target: Servable
    request: InferRequest
    inputs: dict[str, np.ndarray]


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
    """

    runtime: Runtime
    timeout_header: str = "Mds-Timeout"
    priority_header: str = "Mds-Priority"
    max_body_bytes: int = 64 * 1024 * 1024
    retry_after: int = 1
    _retry: tuple[tuple[str, str], ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "_retry", (("Retry-After", str(self.retry_after)),))

    # -- errors -------------------------------------------------------------

    def error(self, exc: BaseException) -> Reply:
        """The reply for a failed request: status by :data:`ERROR_STATUS`, JSON body."""
        status = next((code for kind, code in ERROR_STATUS if isinstance(exc, kind)), None)
        if status is None:
            # Not ours: a bug somewhere. The client learns nothing of the internals.
            logger.error("unexpected error while serving a request", exc_info=exc)
            return Reply(500, _encoder.encode({"error": "internal server error", "type": "Error"}))
        headers = self._retry if isinstance(exc, Unavailable) else ()
        body = _encoder.encode({"error": str(exc), "type": type(exc).__name__})
        return Reply(status, body, JSON, headers)

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
        ready = health.ready and all(p.ready for p in health.pipelines.values())
        return Reply(200 if ready else 503, _encoder.encode(health), JSON, self._unless(ready))

    def target(self, name: str, version: str | None = None) -> Servable:
        """The model or pipeline called ``name`` (at ``version``, if given)."""
        return self.runtime.servable(name, version)

    def model_ready(self, name: str, health: RuntimeHealth, v2: bool = False) -> Reply:
        report = health.models.get(name) or health.pipelines.get(name)
        if report is None:
            raise ModelNotFound(f"no model or pipeline called {name!r}")
        body = (
            {"name": name, "ready": report.ready}
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

    def server_metadata(self) -> Reply:
        meta = protocol.ServerMetadata(
            name="mds", version=__version__, extensions=["binary_tensor_data"]
        )
        return Reply(200, _encoder.encode(meta))

    def model_metadata(self, name: str, version: str | None = None) -> Reply:
        return Reply(200, _encoder.encode(self.metadata(self.target(name, version))))

    def models(self) -> Reply:
        runtime = self.runtime
        names = sorted([*runtime.models, *runtime.pipelines])
        return Reply(200, _encoder.encode([self.metadata(self.target(n)) for n in names]))

    def metadata(self, target: Servable) -> ModelMetadata:
        inputs, outputs = target.signature() or ({}, {})
        return ModelMetadata(
            name=target.name,
            versions=list(target.versions),
            platform=target.platform,
            inputs=[_tensor(spec) for spec in inputs.values()],
            outputs=[_tensor(spec) for spec in outputs.values()],
        )

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

    def json_reply(self, result: Any) -> Reply:
        return Reply(200, self.encode(result))

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
        v2_call: V2Call | None = None
        if v2:
            v2_call = self.v2_request(name, version, body, headers.get(BINARY_HEADER))
            target, payload = v2_call.target, v2_call.inputs
        else:
            target, payload = self.target(name), self.json_request(body)
        streams = target.streams or EVENT_STREAM in headers.get("accept", "")
        return Call(name, payload, timeout, priority, streams, v2_call)

    def reply(self, call: Call, result: Any) -> Reply:
        """The response to ``call`` for the model's ``result``."""
        if call.v2 is not None:
            return self.v2_reply(call.v2, result)
        return self.json_reply(result)

    def stream_event(self, call: Call, chunk: Any) -> bytes:
        """One server-sent event for one chunk of a stream (protocol responses in JSON)."""
        if call.v2 is None:
            return self.event(chunk)
        return b"data: " + self.v2_reply(call.v2, chunk, binary_ok=False).body + b"\n\n"

    def v2_request(
        self, name: str, version: str | None, body: bytes, header_length: str | None
    ) -> V2Call:
        self.check_size(len(body))
        target = self.target(name, version)
        request, binary = protocol.decode_request(body, header_length)
        inputs = protocol.decode_inputs(request, binary)
        signature = target.signature()
        if signature is not None:
            _check_names(target.name, "input", inputs, signature[0], missing=True)
            if request.outputs:
                asked = {o.name: None for o in request.outputs}
                _check_names(target.name, "output", asked, signature[1], missing=False)
        return V2Call(target, request, inputs)

    def v2_reply(self, call: V2Call, result: Any, *, binary_ok: bool = True) -> Reply:
        """The response body for ``result``; ``binary_ok=False`` keeps it all JSON."""
        values = self._named_outputs(call, result)
        request = call.request
        binary: list[str] | bool = bool((request.parameters or {}).get("binary_data_output"))
        if request.outputs:
            wanted = {o.name: o for o in request.outputs}
            unknown = [n for n in wanted if n not in values]
            if unknown:
                raise InvalidInput(
                    f"model {call.target.name!r} gave no output {unknown[0]!r}; it gave "
                    f"{', '.join(values) or 'none'}"
                )
            values = {n: values[n] for n in wanted}
            chosen = [
                n
                for n, o in wanted.items()
                if (o.parameters or {}).get("binary_data", binary is True)
            ]
            binary = chosen
        if not binary_ok:
            binary = False
        try:
            outputs, chunks = protocol.encode_outputs(values, binary)
        except ValueError as exc:
            raise InferenceError(f"model {call.target.name!r}: {exc}") from exc
        response = protocol.InferResponse(
            model_name=call.target.name,
            model_version=call.target.version,
            id=request.id,
            outputs=outputs,
        )
        head = _encoder.encode(response)
        if not chunks:
            return Reply(200, head)
        return Reply(
            200,
            b"".join([head, *chunks]),
            "application/octet-stream",
            ((protocol.BINARY_HEADER, str(len(head))),),
        )

    def _named_outputs(self, call: V2Call, result: Any) -> dict[str, Any]:
        if isinstance(result, Mapping):
            return {str(k): v for k, v in result.items()}
        signature = call.target.signature()
        if signature is not None and len(signature[1]) == 1:
            return {next(iter(signature[1])): result}
        return {"output0": result}


def _check_names(
    model: str,
    what: str,
    given: Mapping[str, Any],
    declared: Mapping[str, TensorSpec],
    *,
    missing: bool,
) -> None:
    if not declared:
        return
    unknown = [n for n in given if n not in declared]
    if unknown:
        raise InvalidInput(
            f"model {model!r} has no {what} {unknown[0]!r}; its {what}s are {', '.join(declared)}"
        )
    absent = [n for n in declared if n not in given] if missing else []
    if absent:
        raise InvalidInput(
            f"model {model!r}: {what} {absent[0]!r} is missing; it needs {', '.join(declared)}"
        )


def _tensor(spec: TensorSpec) -> TensorMetadata:
    try:
        datatype = protocol.datatype_of(np.dtype(spec.dtype)) or spec.dtype
    except TypeError:
        datatype = spec.dtype
    shape = [d if isinstance(d, int) else -1 for d in spec.shape]
    return TensorMetadata(name=spec.name, datatype=datatype, shape=shape)
