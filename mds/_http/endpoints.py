"""mds's routes as plain ASGI endpoints: no framework request object, no validation layer.

The FastAPI adapter serves them through Starlette's router; the standalone
server (:mod:`mds.server`) through its own. Each reads the raw body, decodes
it with msgspec (:class:`~mds._http.service.Service`), serves, and sends the
reply; a client that disconnects cancels its request in the batcher.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, cast

import anyio

from .. import _logs, _tracing
from .._request import request_context, use_request_context
from .asgi import GONE, ClientGone, Failed, Receive, Scope, Send, send_reply, watching
from .service import Call, Reply, Service, allowed, request_id, span_name

__all__ = ["READ", "Dispatch", "Endpoint", "Routes"]


Endpoint = Callable[[Scope, Receive, Send], Awaitable[None]]


class Dispatch:
    """One path's endpoints by method, served by Starlette as a plain ASGI app."""

    __slots__ = ("allowed", "endpoints", "service")

    def __init__(self, service: Service, endpoints: dict[str, Endpoint]) -> None:
        self.service = service
        self.endpoints = endpoints
        self.allowed = allowed(endpoints)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        endpoint = self.endpoints.get("GET" if method == "HEAD" else method)
        if endpoint is None:
            await send_reply(send, self.service.not_allowed(method, self.allowed))
            return
        await endpoint(scope, receive, send)


class Routes:
    """Every route's endpoint, by the route's name (see :func:`~mds._http.service.paths`)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.runtime = service.runtime
        self.timeout_header = service.timeout_header.lower().encode("latin-1")
        self.priority_header = service.priority_header.lower().encode("latin-1")

    # -- health and metadata ------------------------------------------------

    async def live(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_reply(send, self.service.live())

    async def ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._reply(send, self._ready)

    async def _ready(self) -> Reply:
        return self.service.ready(await self.runtime.health())

    async def model_ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = scope["path_params"]["name"]
        await self._reply(send, self._model_ready, name, False)

    async def v2_ready(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        await self._reply(send, self._model_ready, params["name"], True, params.get("version"))

    async def _model_ready(self, name: str, v2: bool, version: str | None = None) -> Reply:
        target = self.service.target(name, version)
        return self.service.model_ready(target, await target.health(), v2)

    async def statistics(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_reply(send, self.service.statistics())

    async def metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        accept = next((v for k, v in scope["headers"] if k == b"accept"), b"")
        # Off the loop: a shared directory is read, devices are asked.
        reply = await anyio.to_thread.run_sync(self.service.metrics_reply, accept.decode("latin-1"))
        await send_reply(send, reply)

    async def status_page(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_reply(send, self.service.status_page())

    async def status_data(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_reply(send, self.service.status_data())

    async def stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        await self._answer(send, self.service.stats, params.get("name"), params.get("version"))

    async def config(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        await self._answer(send, self.service.model_config, params["name"], params.get("version"))

    async def server_metadata(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_reply(send, self.service.server_metadata())

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_reply(send, self.service.models())

    async def metadata(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope["path_params"]
        await self._answer(send, self.service.model_metadata, params["name"], params.get("version"))

    async def _answer(self, send: Send, make: Callable[..., Reply], *args: Any) -> None:
        try:
            reply = make(*args)
        except Exception as exc:
            reply = self.service.error(exc)
        await send_reply(send, reply)

    async def _reply(self, send: Send, make: Callable[..., Awaitable[Reply]], *args: Any) -> None:
        try:
            reply = await make(*args)
        except Exception as exc:
            reply = self.service.error(exc)
        await send_reply(send, reply)

    # -- inference ----------------------------------------------------------

    async def infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._infer(scope, receive, send, v2=False)

    async def v2_infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._infer(scope, receive, send, v2=True)

    async def _infer(self, scope: Scope, receive: Receive, send: Send, *, v2: bool) -> None:
        service = self.service
        params = scope["path_params"]
        try:
            headers = self._headers(scope)
            body = await read_body(receive, service, headers.get("content-length"))
            call = service.request(params["name"], params.get("version"), body, headers, v2=v2)
            named = request_id(call, headers.get("x-request-id"))
            if (
                named is None
                and not call.streams
                and call.context is request_context()
                and _tracing.refresh() is None
            ):
                # Nothing to carry into mds (no trace, id or parameters): most
                # requests, and the blocks below would cost them a tenth more.
                result = await watching(receive, _work(call))
            else:
                # The caller's trace (W3C traceparent) and request id follow the
                # request into mds: the tasks the batcher starts copy this context.
                with (
                    _tracing.continued(headers, server_span=span_name(v2, "version" in params)),
                    _logs.request_id(named),
                    use_request_context(call.context),
                ):
                    if call.streams:
                        await self._stream(receive, send, call)
                        return
                    # A step's caller that leaves ends its sequence (cancelled), however soon.
                    steps = call.context.sequence_id is not None
                    result = await watching(receive, _work(call), at_once=steps)
            if result is GONE:
                return
            if isinstance(result, Failed):
                raise result.exc
            reply = service.reply(call, result)
        except ClientGone:
            return
        except Exception as exc:
            reply = service.error(exc)
        await send_reply(send, reply)

    async def _stream(self, receive: Receive, send: Send, call: Call) -> None:
        service = self.service
        chunks = cast(
            "AsyncGenerator[Any, None]",
            call.target.stream(call.payload, timeout=call.timeout, priority=call.priority),
        )
        try:
            chunk = await watching(receive, anext(chunks, GONE), at_once=True)
            if chunk is GONE:
                return
            if isinstance(chunk, Failed):
                await send_reply(send, service.error(chunk.exc))
                return
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                        (b"mds-model-version", call.target.version.encode("latin-1")),
                    ],
                }
            )
            while True:
                try:
                    data = service.stream_event(call, chunk)
                except Exception as exc:
                    data = service.error_event(exc)
                    chunk = GONE
                await send({"type": "http.response.body", "body": data, "more_body": True})
                if chunk is GONE:
                    break
                chunk = await watching(receive, anext(chunks, GONE), at_once=True)
                if isinstance(chunk, Failed):
                    data = service.error_event(chunk.exc)
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                    break
                if chunk is GONE:
                    break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                await chunks.aclose()

    def _headers(self, scope: Scope) -> dict[str, str]:
        """The headers the routes read, by the names :class:`Service` uses."""
        found: dict[str, str] = {}
        for key, value in scope["headers"]:
            if key == self.timeout_header:
                found[self.service.timeout_header] = value.decode("latin-1")
            elif key == self.priority_header:
                found[self.service.priority_header] = value.decode("latin-1")
            elif key in READ:
                found[key.decode("latin-1")] = value.decode("latin-1")
        return found


def _work(call: Call) -> Awaitable[Any]:
    """Serving ``call``: its payload, or each of its rows."""
    if call.rows is None:
        return call.target.serve(call.payload, timeout=call.timeout, priority=call.priority)
    return call.target.serve_many(call.rows, timeout=call.timeout, priority=call.priority)


async def read_body(receive: Receive, service: Service, length: str | None) -> bytes:
    """The request's body, refused as soon as it is larger than ``service.max_body_bytes``.

    Raises:
        DecodeError: too large (by its ``Content-Length`` or as it arrives).
        ClientGone: the client left while sending it.
    """
    if length is not None and length.isdigit():
        service.check_size(int(length))
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body = message.get("body", b"")
    if not message.get("more_body", False):
        service.check_size(len(body))
        return bytes(body)
    limit = service.max_body_bytes
    parts = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise service.too_large(size)
        parts.append(chunk)
    return b"".join(parts)


READ = frozenset(
    {
        b"content-length",
        b"accept",
        b"inference-header-content-length",
        # the caller's trace context and request id (mds._tracing.continued, mds._logs.request_id)
        b"traceparent",
        b"tracestate",
        b"x-request-id",
        # a step of a sequence, on the JSON route (mds._http.service)
        b"mds-sequence-id",
        b"mds-sequence-start",
        b"mds-sequence-end",
    }
)
