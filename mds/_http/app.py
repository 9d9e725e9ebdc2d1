"""mds's routes as one ASGI application of its own: no framework, a router of a few lines.

What ``mds serve`` runs, and what :func:`mds.server.app` gives an app that
wants mds's routes at their own speed (mount it in FastAPI or Starlette, or
serve it with any ASGI server). A request finds its endpoint by a dictionary
lookup (fixed paths) or by matching the path's segments against the few
patterns (``/v2/models/{name}/infer``); the endpoints are the FastAPI
adapter's (:mod:`mds._http.endpoints`). The ASGI lifespan runs the runtime.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import msgspec

from .._errors import describe, excerpt
from .._repository.repository import ModelRepository
from .._runtime import Load, Runtime
from .asgi import ClientGone, Receive, Scope, Send, send_reply
from .endpoints import Dispatch, Endpoint, Routes, read_body
from .matching import PathTable, route_path
from .repository import REPOSITORY_ROUTES, Repository
from .service import Reply, Service, paths

__all__ = ["App"]

logger = logging.getLogger("mds.http")


class App:
    """An ASGI application serving ``service``'s routes; its lifespan runs the runtime.

    Args:
        service: what the routes answer with (the runtime, limits, metrics).
        prefix: a path prefix for every route.
        v2: add the Open Inference Protocol's routes.
        status_page: add ``/status`` and ``/status/data``.
        repository: add the protocol's repository routes for it (no auth of
            their own: keep such a server behind yours).
        load: how the lifespan starts the runtime (see :meth:`mds.Runtime.run`).
        companions: async context managers entered with the runtime, after
            it starts (a gRPC server, say).
        background: async functions run while the app runs, cancelled when
            it stops.
    """

    def __init__(
        self,
        service: Service,
        *,
        prefix: str = "",
        v2: bool = True,
        status_page: bool = False,
        repository: ModelRepository | None = None,
        load: Load = "background",
        companions: tuple[Any, ...] = (),
        background: tuple[Callable[[], Coroutine[Any, Any, None]], ...] = (),
    ) -> None:
        self.service = service
        self.runtime: Runtime = service.runtime
        prefix = prefix.strip("/")
        self.prefix = f"/{prefix}" if prefix else ""
        self._load = load
        self._companions = companions
        self._background = background
        routes = Routes(service)
        wanted = paths(v2, metrics=service.metrics is not None, status_page=status_page)
        table: dict[str, dict[str, Endpoint]] = {
            path: {method: getattr(routes, name) for method, name in methods.items()}
            for path, methods in wanted.items()
        }
        if repository is not None:
            added = _RepositoryRoutes(service, repository)
            for method, path, name in REPOSITORY_ROUTES:
                table.setdefault(path, {})[method] = getattr(added, name)
        self._paths = PathTable(
            {self.prefix + path: Dispatch(service, endpoints) for path, endpoints in table.items()}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = route_path(scope)
            found = self._paths.find(path)
            if found is None and path.endswith("/") and len(path) > 1:
                path = path[:-1]  # "/health/live/" is "/health/live"
                found = self._paths.find(path)
            if found is None:
                await send_reply(send, self._not_found(path))
                return
            dispatch, params = found
            scope["path_params"] = dict(params)
            await dispatch(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":  # none served: refuse the handshake
            if (await receive())["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})

    def _not_found(self, path: str) -> Reply:
        message = f"no route {excerpt(path, 200)!r}: see mds's routes under {self.prefix or '/'}"
        return Reply(404, msgspec.json.encode({"error": message, "type": "NotFound"}))

    # -- the lifespan -----------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        started = False
        try:
            async with self.running():
                started = True
                await send({"type": "lifespan.startup.complete"})
                await receive()  # lifespan.shutdown
        except BaseException as exc:
            if not started:
                await send({"type": "lifespan.startup.failed", "message": describe(exc)})
                return
            await send({"type": "lifespan.shutdown.failed", "message": describe(exc)})
            raise
        await send({"type": "lifespan.shutdown.complete"})

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The runtime (unless it already runs), then the companions, for as long as inside."""
        async with AsyncExitStack() as stack:
            if not self.runtime.running:
                await stack.enter_async_context(self.runtime.run(load=self._load))
            for companion in self._companions:
                await stack.enter_async_context(companion)
            if self._background:
                tasks = await stack.enter_async_context(anyio.create_task_group())
                stack.callback(tasks.cancel_scope.cancel)  # runs first, on the way out
                for run in self._background:
                    tasks.start_soon(run)
            yield


class _RepositoryRoutes:
    """The protocol's repository routes, as plain endpoints."""

    def __init__(self, service: Service, repository: ModelRepository) -> None:
        self.service = service
        self.repository = repository
        self.routes = Repository(repository)

    async def repository_index(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def index(body: bytes) -> Reply:
            return self.routes.index(body)

        await self._answer(scope, receive, send, index)

    async def repository_load(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = scope["path_params"]["name"]

        async def load(body: bytes) -> Reply:
            await self.repository.load(name, self.routes.load_config(body))
            return self.routes.done(name)

        await self._answer(scope, receive, send, load)

    async def repository_unload(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = scope["path_params"]["name"]

        async def unload(body: bytes) -> Reply:
            self.routes.check_unload(body)
            await self.repository.unload(name)
            return self.routes.done(name)

        await self._answer(scope, receive, send, unload)

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, act: Callable[[bytes], Awaitable[Reply]]
    ) -> None:
        try:
            reply = await act(await read_body(receive, self.service, _length(scope)))
        except ClientGone:
            return  # no one to answer
        except Exception as exc:
            reply = self.service.error(exc)
        await send_reply(send, reply)


def _length(scope: Scope) -> str | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            return str(value.decode("latin-1"))
    return None
