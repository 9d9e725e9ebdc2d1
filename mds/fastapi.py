"""Serve a runtime's models from your FastAPI (or any Starlette) app.

One call adds mds's routes to your app and starts and stops the runtime with
the app's lifespan::

    app = FastAPI()
    mds.fastapi.add_routes(app, runtime)

Your own routes, middleware and auth stay as they are; ``await mds.serve``
works in your routes beside mds's. The routes are plain ASGI endpoints: the
request body is read raw and decoded with msgspec, with no validation layer
in between, and a client that disconnects cancels its request in the batcher.

Routes (under ``prefix``), each answering JSON:

==========  ====================================  =========================================
``GET``     ``/health/live``                      200 while the runtime runs, else 503
``GET``     ``/health/ready``                     200 when every model is ready, else 503
``GET``     ``/models``                           every model's and pipeline's metadata
``GET``     ``/models/{name}``                    one model's metadata
``GET``     ``/models/{name}/ready``              one model's health; 200 or 503
``POST``    ``/models/{name}/infer``              JSON request in, JSON response out;
                                                  server-sent events for a streaming model
``GET``     ``/statistics``                       every model's counters
``POST``    ``/models/{name}/versions/{v}/infer``  the same, served by version ``v``
``...``     ``/v2/...``                           the Open Inference Protocol (KServe V2)
``POST``    ``/v2/repository/...``                the protocol's model repository routes
                                                  (index, load, unload), with ``repository``
``GET``     ``/metrics``                          Prometheus metrics, with ``metrics``
``GET``     ``/status``                           an HTML status page, with ``status_page``
==========  ====================================  =========================================

Added in 0.2.
"""

from __future__ import annotations

from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING, Any

from ._deps import require
from ._errors import MdsError
from ._http.endpoints import Dispatch, Routes
from ._http.lane import Lane, plain_route_types
from ._http.openapi import describe
from ._http.repository import REPOSITORY_ROUTES, Repository
from ._http.service import (
    Reply,
    Service,
    error_reply,
    make_service,
    paths,
)
from ._repository.repository import ModelRepository
from ._runtime import Load, Runtime

if TYPE_CHECKING:
    from fastapi import APIRouter
    from starlette.applications import Starlette

__all__ = ["add_error_handlers", "add_routes", "lifespan", "router"]


def router(
    runtime: Runtime,
    *,
    prefix: str = "",
    v2: bool = True,
    timeout_header: str = "Mds-Timeout",
    priority_header: str = "Mds-Priority",
    max_body_bytes: int = 64 * 1024 * 1024,
    retry_after: int = 1,
    repository: ModelRepository | None = None,
    repository_dependencies: Sequence[Any] = (),
    metrics: Any = False,
    status_page: bool = False,
) -> APIRouter:
    """An ``APIRouter`` with mds's routes for ``runtime``; include it in your app.

    It does not start the runtime: use :func:`add_routes`, which does, or
    enter ``runtime`` (or :func:`lifespan`) in your own lifespan.

    Args:
        runtime: the runtime whose models and pipelines are served.
        prefix: a path prefix for every route, such as ``"/ml"``.
        v2: also add the Open Inference Protocol routes under ``{prefix}/v2``.
        timeout_header: the request header that sets a request's deadline,
            in seconds, in place of the model's own ``timeout`` (its default).
        priority_header: the request header that sets a request's priority
            level (0 is the highest).
        max_body_bytes: a larger request body gets a 400 before it is read.
        retry_after: the ``Retry-After`` seconds sent with a 429 or 503.
        repository: add the protocol's model repository routes (index,
            load, unload, as Triton serves them) for this repository, which
            must have been added to ``runtime``. They change what the server
            runs: guard them with ``repository_dependencies``. Added in 0.4.
        repository_dependencies: FastAPI dependencies run before each
            repository route, such as ``[Depends(require_admin)]``: your
            auth. Added in 0.4.
        metrics: add ``GET {prefix}/metrics`` for Prometheus: ``True`` serves
            ``runtime``'s metrics (:class:`mds.prometheus.Collector`); a
            ``prometheus_client.CollectorRegistry`` is served as it is (register
            the collector in it yourself, beside your own metrics, or with a
            shared ``directory`` for several workers). Added in 0.5.
        status_page: add ``GET {prefix}/status``, an HTML page of every
            model's and pipeline's state, traffic and latency, refreshed in
            place, and ``GET {prefix}/status/data``, the JSON it reads.
            Added in 0.5.

    Raises:
        MissingDependency: FastAPI is not installed (``pip install mds-serving[fastapi]``).
    """
    fastapi = require("fastapi", feature="mds.fastapi")
    from starlette.routing import Route

    service = make_service(
        runtime,
        repository=repository is not None,
        metrics=metrics,
        timeout_header=timeout_header,
        priority_header=priority_header,
        max_body_bytes=max_body_bytes,
        retry_after=retry_after,
    )
    routes = Routes(service)
    found: APIRouter = fastapi.APIRouter(prefix=prefix)
    wanted = paths(v2, metrics=service.metrics is not None, status_page=status_page)
    for path, methods in wanted.items():
        # An ASGI callable (not a function) is served as it is: no request
        # object, no dependency solving, no body validation in between. It
        # takes every method: one the path does not answer gets mds's 405.
        endpoints = {method: getattr(routes, name) for method, name in methods.items()}
        endpoint = Dispatch(service, endpoints)
        found.routes.append(Route(prefix + path, endpoint, include_in_schema=False))
    # Infer routes first: the router tries routes in turn, and most requests
    # infer. (A stable sort: "/v2/models/stats" stays before "/v2/models/{name}".)
    found.routes.sort(key=lambda route: not getattr(route, "path", "").endswith("/infer"))
    if repository is not None:
        _add_repository_routes(found, prefix, service, repository, repository_dependencies)
    found.mds_paths = wanted  # type: ignore[attr-defined]  # what _describe documents
    return found


def _add_repository_routes(
    found: APIRouter,
    prefix: str,
    service: Service,
    repository: ModelRepository,
    dependencies: Sequence[Any],
) -> None:
    """The repository routes: FastAPI routes, so that the app's own dependencies guard them."""
    from starlette.requests import Request
    from starlette.responses import Response

    routes = Repository(repository)

    def respond(reply: Reply) -> Response:
        return Response(
            reply.body, reply.status, dict(reply.headers), media_type=reply.content_type
        )

    async def index(request: Request) -> Response:
        try:
            return respond(routes.index(await request.body()))
        except Exception as exc:
            return respond(service.error(exc))

    async def load(name: str, request: Request) -> Response:
        try:
            config = routes.load_config(await request.body())
            await repository.load(name, config)
            return respond(routes.done(name))
        except Exception as exc:
            return respond(service.error(exc))

    async def unload(name: str, request: Request) -> Response:
        try:
            routes.check_unload(await request.body())
            await repository.unload(name)
            return respond(routes.done(name))
        except Exception as exc:
            return respond(service.error(exc))

    endpoints: dict[str, Callable[..., Awaitable[Response]]] = {
        "repository_index": index,
        "repository_load": load,
        "repository_unload": unload,
    }
    for endpoint in endpoints.values():
        # Real classes, not this module's postponed strings: FastAPI reads them.
        endpoint.__annotations__ = {
            **{k: str for k in endpoint.__annotations__ if k == "name"},
            "request": Request,
            "return": Response,
        }
    for method, path, name in REPOSITORY_ROUTES:
        found.add_api_route(
            prefix + path,
            endpoints[name],
            methods=[method],
            dependencies=list(dependencies),
            include_in_schema=False,
        )


def lifespan(
    runtime: Runtime, *, load: Load = "background"
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A FastAPI/Starlette lifespan that runs ``runtime`` for the app's lifetime.

    Models drain when the app shuts down. A runtime already running is left
    alone.

    Args:
        runtime: the runtime to run.
        load: ``"background"`` (the default): the server takes connections
            at once, ``/health/live`` answers 200 and readiness 503 (with
            each model's state) until every model is ready, as Kubernetes'
            probes expect of a server whose models take minutes to load.
            ``"wait"``: the app starts once every model is ready (or fails
            to start if one fails), so startup code may call the models.
            See :meth:`mds.Runtime.run`. Added in 0.3; before, the app always
            waited.
    """

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        if runtime.running:
            yield
            return
        async with runtime.run(load=load):
            yield

    return run


def add_routes(
    app: Starlette,
    runtime: Runtime,
    *,
    prefix: str = "",
    v2: bool = True,
    timeout_header: str = "Mds-Timeout",
    priority_header: str = "Mds-Priority",
    max_body_bytes: int = 64 * 1024 * 1024,
    retry_after: int = 1,
    load: Load = "background",
    repository: ModelRepository | None = None,
    repository_dependencies: Sequence[Any] = (),
    metrics: Any = False,
    status_page: bool = False,
) -> APIRouter:
    """Add mds's routes and error handlers to ``app``; run ``runtime`` with its lifespan.

    The runtime starts before the app's own lifespan and stops after it;
    ``load`` says whether the app waits for the models (see :func:`lifespan`;
    added in 0.3, when the default became ``"background"``). Your own routes
    that call ``mds.serve`` answer mds's errors with the same statuses and
    bodies as mds's routes (see :func:`add_error_handlers`). The other
    arguments are those of :func:`router`.

    Returns:
        The router that was included.

    Example:
        >>> app = FastAPI()
        >>> mds.fastapi.add_routes(app, runtime, prefix="/ml")
    """
    found = router(
        runtime,
        prefix=prefix,
        v2=v2,
        timeout_header=timeout_header,
        priority_header=priority_header,
        max_body_bytes=max_body_bytes,
        retry_after=retry_after,
        repository=repository,
        repository_dependencies=repository_dependencies,
        metrics=metrics,
        status_page=status_page,
    )
    # Before the app's first catch-all (a ``{...:path}`` route, a mount), so
    # that it cannot shadow them; after the app's other routes, as before,
    # but ahead of the framework's own pages (the docs and the schema): the
    # router tries routes in turn, and those pages are rarely asked for.
    existing = app.router.routes
    first = next((i for i, r in enumerate(existing) if _catches_all(r)), len(existing))
    before = existing[:first]
    pages = _pages_to_move(app, before, found.routes)
    kept = [r for r in before if all(r is not page for page in pages)]
    existing[:first] = kept + found.routes + pages
    if app.middleware_stack is None:  # not started yet: the lane goes innermost
        from starlette.middleware import Middleware

        ours = [r for r in found.routes if isinstance(getattr(r, "endpoint", None), Dispatch)]
        app.user_middleware.append(Middleware(Lane, router=app.router, ours=ours))
    routes = [
        (method, path, route)
        for path, methods in found.mds_paths.items()  # type: ignore[attr-defined]
        for method, route in methods.items()
    ]
    describe(app, [*routes, *(REPOSITORY_ROUTES if repository is not None else ())], prefix)
    add_error_handlers(app, retry_after=retry_after)
    inner = app.router.lifespan_context
    outer = lifespan(runtime, load=load)

    @asynccontextmanager
    async def both(app: Any) -> AsyncIterator[Any]:
        async with outer(app), inner(app) as state:
            yield state

    app.router.lifespan_context = both
    return found


def _pages_to_move(app: Any, before: list[Any], ours: list[Any]) -> list[Any]:
    """FastAPI's documentation pages in ``before`` that may follow ``ours`` and ``before``'s rest.

    A page moves only where no route answers its path differently for it:
    none of ``ours`` matches the path, and no route it would then follow
    takes a ``GET`` or ``HEAD`` of it (a route whose matching cannot be told
    from its path keeps the page where it is).
    """
    from starlette.routing import Match

    docs = getattr(app, "docs_url", None)
    names = {
        getattr(app, "openapi_url", None),
        docs,
        getattr(app, "redoc_url", None),
        getattr(app, "swagger_ui_oauth2_redirect_url", None) if docs else None,
    } - {None}
    plain = plain_route_types()

    def page(route: Any) -> bool:
        return type(route) in plain and not route.param_convertors and route.path in names

    def takes(route: Any, path: str) -> bool:
        if type(route) not in plain:
            return True  # a mount, a host, a route class of the app's: cannot tell
        for method in ("GET", "HEAD"):
            scope = {"type": "http", "path": path, "root_path": "", "method": method}
            if route.matches(scope)[0] is Match.FULL:
                return True
        return False

    return [
        route
        for i, route in enumerate(before)
        if page(route)
        and not any(r.path_regex.match(route.path) for r in ours)
        and not any(takes(r, route.path) for r in before[i + 1 :] if not page(r))
    ]


def _catches_all(route: Any) -> bool:
    """Whether ``route`` matches paths of any depth: a mount, or a ``{...:path}`` parameter."""
    from starlette.routing import Mount

    return isinstance(route, Mount) or ":path}" in getattr(route, "path", "")


def add_error_handlers(app: Starlette, *, retry_after: int = 1) -> None:
    """Answer mds's errors in ``app``'s own routes as mds's routes do.

    An :class:`mds.MdsError` that a route of yours lets out (from
    ``await mds.serve(...)``, say) becomes the status of mds's one table
    (400 bad input, 404 unknown model, 429 overloaded, 503 not ready, 504
    deadline, 500 inference failure) with mds's JSON error body, and
    ``Retry-After`` on a 429 or 503. :func:`add_routes` calls it.

    Example:
        >>> app = FastAPI()
        >>> mds.fastapi.add_error_handlers(app)
        >>> @app.post("/classify")
        ... async def classify(features: list[float]) -> dict:
        ...     return await mds.serve("classifier", features)  # bad input: a 400

    Added in 0.3.
    """
    from starlette.responses import Response

    def handle(request: Any, exc: Exception) -> Response:
        reply = error_reply(exc, retry_after)
        return Response(
            reply.body, reply.status, dict(reply.headers), media_type=reply.content_type
        )

    app.add_exception_handler(MdsError, handle)
