"""One gRPC call: the caller's trace and request id, its deadline, and mds's errors as statuses."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import anyio
import grpc

from .. import _logs, _tracing
from .._errors import (
    DeadlineExceeded,
    InferenceError,
    InvalidInput,
    MdsError,
    ModelNotFound,
    Overloaded,
    RequestError,
    Unavailable,
    excerpt,
    quote,
)
from .._oip import call as v2_call
from .._oip.call import V2Call
from .._servable import Servable
from . import codec

__all__ = [
    "EMPTY_FINAL",
    "ERROR_STATUS",
    "SERVICE",
    "abort",
    "deadline",
    "error_status",
    "metadata",
    "named",
    "prepare",
    "prepared",
    "served",
    "traced",
]

logger = logging.getLogger("mds.grpc")

SERVICE = "inference.GRPCInferenceService"

#: Error class -> gRPC status, most specific first: the one table the service uses.
ERROR_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),  # DecodeError, InvalidInput
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),  # NotReady
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (InferenceError, grpc.StatusCode.INTERNAL),
    (MdsError, grpc.StatusCode.INTERNAL),
)

#: The most characters of an error message a status carries.
MAX_MESSAGE = 2000
#: The most characters of a request id kept for logs and traces.
MAX_REQUEST_ID = 128

#: The request parameter that asks a stream for an empty last response
#: (Triton's decoupled models): the transport's, never the handler's.
EMPTY_FINAL = "triton_enable_empty_final_response"

#: What mds reads of the call's metadata: the caller's trace context and request id.
_READ = frozenset({"traceparent", "tracestate", "x-request-id"})


def error_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and details for ``exc`` by :data:`ERROR_STATUS`.

    The details are the message, bounded. An error that is not mds's is a
    bug: the client gets a bare INTERNAL, the log the whole story.
    """
    for kind, code in ERROR_STATUS:
        if isinstance(exc, kind):
            return code, excerpt(str(exc), MAX_MESSAGE)
    logger.error("unexpected error while serving a gRPC request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal server error"


async def abort(context: Any, exc: BaseException) -> None:
    """End the call with ``exc``'s status: raises grpc.aio's ``AbortError``."""
    code, details = error_status(exc)
    await context.abort(code, details)


def metadata(context: Any) -> dict[str, str]:
    """The call metadata mds reads (trace context, request id), by name (gRPC's are lower-case)."""
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if key in _READ and isinstance(value, str):
            found[key] = value
    return found


def named(headers: Mapping[str, str], given_id: str | None) -> AbstractContextManager[None]:
    """Serve inside the block under the caller's request id, for logs and spans.

    The id is the ``x-request-id`` metadata, else the request's ``id``.
    """
    found = headers.get("x-request-id") or given_id
    return _logs.request_id(found[:MAX_REQUEST_ID] if found else None)


def traced(method: str, headers: Mapping[str, str]) -> AbstractContextManager[None]:
    """Serve inside the block in the caller's trace (W3C ``traceparent`` metadata), if traced."""
    return _tracing.continued(
        headers,
        server_span=f"{SERVICE}/{method}",
        attributes={"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": method},
    )


@contextmanager
def served(method: str, headers: Mapping[str, str], given_id: str | None) -> Iterator[None]:
    """Serve inside the block under the caller's request id, in its trace."""
    with named(headers, given_id), traced(method, headers):
        yield


def prepare(target: Servable, message: Any, headers: Mapping[str, str]) -> tuple[V2Call, bool]:
    """The call ``message`` makes of ``target``, and whether it asks for an empty final response.

    Raises:
        RequestError: the message does not fit the protocol, or its tensors
            and parameters the model.
    """
    request, tensors = codec.decode(message)
    final = False
    if request.parameters and EMPTY_FINAL in request.parameters:
        final = request.parameters.pop(EMPTY_FINAL)
        if not isinstance(final, bool):
            raise InvalidInput(f"parameters[{EMPTY_FINAL!r}]: {quote(final)} is not a bool_param")
    return v2_call.prepare(target, request, tensors, headers.get("x-request-id")), final


#: Typed contents larger than this are decoded in a worker thread: a Python
#: value per element costs about 0.1 s per million, which would stall the loop.
LARGE_TYPED = 1 << 20


async def prepared(
    target: Servable, message: Any, headers: Mapping[str, str]
) -> tuple[V2Call, bool]:
    """:func:`prepare`, off the event loop for a large request in typed contents."""
    if not message.raw_input_contents and message.ByteSize() > LARGE_TYPED:
        return await anyio.to_thread.run_sync(prepare, target, message, headers)
    return prepare(target, message, headers)


def deadline(call: V2Call, context: Any) -> float | None:
    """The request's timeout in seconds: the earlier of its ``timeout`` parameter and the call's."""
    remaining: float | None = context.time_remaining()
    if remaining is None:
        return call.timeout
    return remaining if call.timeout is None else min(call.timeout, remaining)
