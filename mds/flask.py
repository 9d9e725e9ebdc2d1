"""Serve a runtime's models from your Flask app.

One call adds mds's routes to your app (as a Blueprint) and starts the
runtime in mds's background event loop; it drains at interpreter exit::

    app = Flask(__name__)
    mds.flask.add_routes(app, runtime)

Your own views stay as they are; ``mds.serve_sync`` works in them beside
mds's routes. The routes are those of :mod:`mds.fastapi`, with the same
bodies and the same error table. A WSGI server cannot tell a view that its
client left, so a request whose client disconnects is still computed; give
requests a deadline (the ``Mds-Timeout`` header, or the model's ``timeout``).

Under gunicorn, call ``add_routes`` in each worker (the default; not with
``--preload``, since the runtime's loop thread does not survive a fork).

Added in 0.2.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from . import _logs, _tracing
from ._deps import require
from ._errors import MdsError
from ._http.repository import REPOSITORY_ROUTES, Repository
from ._http.service import (
    VERSION_HEADER,
    Call,
    Reply,
    Service,
    allowed,
    error_reply,
    make_service,
    paths,
    request_id,
    span_name,
)
from ._repository.repository import ModelRepository
from ._request import use_request_context
from ._runtime import Load, Runtime

if TYPE_CHECKING:
    from flask import Blueprint, Flask, Response

__all__ = ["add_error_handlers", "add_routes", "blueprint"]


def blueprint(
    runtime: Runtime,
    *,
    name: str = "mds",
    v2: bool = True,
    timeout_header: str = "Mds-Timeout",
    priority_header: str = "Mds-Priority",
    max_body_bytes: int = 64 * 1024 * 1024,
    retry_after: int = 1,
    repository: ModelRepository | None = None,
    repository_decorator: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
    metrics: Any = False,
    status_page: bool = False,
) -> Blueprint:
    """A Blueprint with mds's routes for ``runtime``; register it on your app.

    It does not start the runtime: :func:`add_routes` does, or call
    ``runtime.start_sync()`` yourself. The arguments are those of
    :func:`mds.fastapi.router`; ``name`` is the Blueprint's name.
    ``repository_decorator`` wraps each repository view (your auth, such
    as ``login_required``) as FastAPI's ``repository_dependencies`` guard
    them there (added in 0.4).

    Raises:
        MissingDependency: Flask is not installed (``pip install mds-serving[flask]``).
    """
    flask = require("flask", feature="mds.flask")
    service = make_service(
        runtime,
        repository=repository is not None,
        metrics=metrics,
        timeout_header=timeout_header,
        priority_header=priority_header,
        max_body_bytes=max_body_bytes,
        retry_after=retry_after,
    )
    views = _Views(service, flask)
    found: Blueprint = flask.Blueprint(name, __name__)
    wanted = paths(v2, metrics=service.metrics is not None, status_page=status_page)
    for index, (path, methods) in enumerate(wanted.items()):
        rule = re.sub(r"\{(\w+)\}", r"<\1>", path)  # {name} -> <name>
        # Every method, dispatched here: one the path does not answer gets
        # mds's 405 (Flask's own would be an HTML page).
        view = _Dispatch(views, {method: getattr(views, v) for method, v in methods.items()})
        found.add_url_rule(
            rule,
            f"{'_'.join(sorted(set(methods.values())))}_{index}",
            view,
            methods=_METHODS,
            provide_automatic_options=False,
        )
    if repository is not None:
        _add_repository_routes(found, views, repository, repository_decorator)
    return found


def _add_repository_routes(
    found: Blueprint,
    views: _Views,
    repository: ModelRepository,
    decorator: Callable[[Callable[..., Any]], Callable[..., Any]] | None,
) -> None:
    routes = Repository(repository)
    request = views.flask.request

    def index() -> Response:
        return views._answer(lambda: routes.index(request.get_data()))

    def load(name: str) -> Response:
        def run() -> Reply:
            config = routes.load_config(request.get_data())
            repository.load_sync(name, config)
            return routes.done(name)

        return views._answer(run)

    def unload(name: str) -> Response:
        def run() -> Reply:
            routes.check_unload(request.get_data())
            repository.unload_sync(name)
            return routes.done(name)

        return views._answer(run)

    endpoints: dict[str, Callable[..., Any]] = {
        "repository_index": index,
        "repository_load": load,
        "repository_unload": unload,
    }
    for method, path, name in REPOSITORY_ROUTES:
        view = endpoints[name]
        if decorator is not None:
            view = decorator(view)
        rule = re.sub(r"\{(\w+)\}", r"<\1>", path)
        found.add_url_rule(rule, name, view, methods=[method])


def add_routes(
    app: Flask,
    runtime: Runtime,
    *,
    prefix: str = "",
    name: str = "mds",
    v2: bool = True,
    timeout_header: str = "Mds-Timeout",
    priority_header: str = "Mds-Priority",
    max_body_bytes: int = 64 * 1024 * 1024,
    retry_after: int = 1,
    load: Load = "background",
    repository: ModelRepository | None = None,
    repository_decorator: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
    metrics: Any = False,
    status_page: bool = False,
) -> Blueprint:
    """Add mds's routes and error handlers to ``app``; start ``runtime`` if it is not running.

    The runtime starts now, in mds's background event loop, and is drained
    and stopped at interpreter exit. With ``load="background"`` (the
    default) its models load meanwhile: the server takes connections at
    once, ``/health/live`` answers 200 and readiness 503 until every model
    is ready, as Kubernetes' probes expect. With ``"wait"`` this returns once
    every model is ready, and raises if one failed. Your own views that call
    ``mds.serve_sync`` answer mds's errors as mds's routes do (see
    :func:`add_error_handlers`). The other arguments are those of :func:`blueprint`.
    (``load``, the error handlers and the background default: added in 0.3.)

    Returns:
        The Blueprint that was registered.

    Raises:
        LifecycleError: with ``load="wait"``, a model failed to start.

    Example:
        >>> app = Flask(__name__)
        >>> mds.flask.add_routes(app, runtime, prefix="/ml")
    """
    found = blueprint(
        runtime,
        name=name,
        v2=v2,
        timeout_header=timeout_header,
        priority_header=priority_header,
        max_body_bytes=max_body_bytes,
        retry_after=retry_after,
        repository=repository,
        repository_decorator=repository_decorator,
        metrics=metrics,
        status_page=status_page,
    )
    app.register_blueprint(found, url_prefix=prefix or None)
    add_error_handlers(app, retry_after=retry_after)
    _answer_other_methods(app, found)
    if not runtime.running:
        runtime.start_sync(load=load)
    return found


def add_error_handlers(app: Flask, *, retry_after: int = 1) -> None:
    """Answer mds's errors in ``app``'s own views as mds's routes do.

    An :class:`mds.MdsError` that a view of yours lets out (from
    ``mds.serve_sync(...)``, say) becomes the status of mds's one table
    (400 bad input, 404 unknown model, 429 overloaded, 503 not ready, 504
    deadline, 500 inference failure) with mds's JSON error body, and
    ``Retry-After`` on a 429 or 503. :func:`add_routes` calls it.

    Added in 0.3.
    """
    flask = require("flask", feature="mds.flask")

    def handle(exc: MdsError) -> Response:
        return _response(flask, error_reply(exc, retry_after))

    app.register_error_handler(MdsError, handle)


def _answer_other_methods(app: Flask, found: Blueprint) -> None:
    """Mds's 405 for a method Flask routes nowhere (``TRACE``...) on one of mds's paths.

    Routing fails before a blueprint is known, so this is the app's handler;
    it answers as Flask would for any path that is not mds's.
    """
    flask = require("flask", feature="mds.flask")
    from werkzeug.exceptions import MethodNotAllowed

    def handle(exc: MethodNotAllowed) -> Any:
        request = flask.request
        adapter = app.url_map.bind_to_environ(request.environ)
        for method in exc.valid_methods or ():
            try:
                endpoint, _ = adapter.match(method=method)
            except Exception:
                continue
            view = app.view_functions.get(endpoint)
            if endpoint.startswith(f"{found.name}.") and isinstance(view, _Dispatch):
                return view.views._response(
                    view.views.service.not_allowed(request.method, view.allowed)
                )
            break
        return exc.get_response()

    app.register_error_handler(MethodNotAllowed, handle)


def _response(flask: Any, reply: Reply) -> Response:
    response: Response = flask.Response(
        reply.body, status=reply.status, content_type=reply.content_type
    )
    for key, value in reply.headers:
        response.headers[key] = value
    return response


_END = object()

#: The methods each path takes to the view, which answers those it does not serve.
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class _Dispatch:
    """One path's views by method."""

    def __init__(self, views: _Views, endpoints: dict[str, Callable[..., Response]]) -> None:
        self.views = views
        self.endpoints = endpoints
        self.allowed = allowed(endpoints)

    def __call__(self, **params: Any) -> Response:
        method = self.views.flask.request.method
        endpoint = self.endpoints.get("GET" if method == "HEAD" else method)
        if endpoint is None:
            return self.views._response(self.views.service.not_allowed(method, self.allowed))
        return endpoint(**params)


class _Views:
    def __init__(self, service: Service, flask: Any) -> None:
        self.service = service
        self.runtime = service.runtime
        self.flask = flask

    def _response(self, reply: Reply) -> Response:
        return _response(self.flask, reply)

    def _answer(self, make: Callable[..., Reply], *args: Any) -> Response:
        try:
            reply = make(*args)
        except Exception as exc:
            reply = self.service.error(exc)
        return self._response(reply)

    # -- health and metadata ------------------------------------------------

    def live(self) -> Response:
        return self._response(self.service.live())

    def ready(self) -> Response:
        return self._answer(lambda: self.service.ready(self.runtime.health_sync()))

    def model_ready(self, name: str) -> Response:
        return self._answer(self._model_ready, name, False, None)

    def v2_ready(self, name: str, version: str | None = None) -> Response:
        return self._answer(self._model_ready, name, True, version)

    def _model_ready(self, name: str, v2: bool, version: str | None) -> Reply:
        target = self.service.target(name, version)
        return self.service.model_ready(target, target.health_sync(), v2)

    def statistics(self) -> Response:
        return self._response(self.service.statistics())

    def metrics(self) -> Response:
        accept = self.flask.request.headers.get("Accept")
        return self._answer(self.service.metrics_reply, accept)

    def status_page(self) -> Response:
        return self._response(self.service.status_page())

    def status_data(self) -> Response:
        return self._response(self.service.status_data())

    def stats(self, name: str | None = None, version: str | None = None) -> Response:
        return self._answer(self.service.stats, name, version)

    def config(self, name: str, version: str | None = None) -> Response:
        return self._answer(self.service.model_config, name, version)

    def server_metadata(self) -> Response:
        return self._response(self.service.server_metadata())

    def models(self) -> Response:
        return self._response(self.service.models())

    def metadata(self, name: str, version: str | None = None) -> Response:
        return self._answer(self.service.model_metadata, name, version)

    # -- inference ----------------------------------------------------------

    def infer(self, name: str, version: str | None = None) -> Response:
        return self._infer(name, version, v2=False)

    def v2_infer(self, name: str, version: str | None = None) -> Response:
        return self._infer(name, version, v2=True)

    def _infer(self, name: str, version: str | None, *, v2: bool) -> Response:
        service = self.service
        request = self.flask.request
        try:
            service.check_size(request.content_length)
            body = request.get_data(cache=False)
            call = service.request(name, version, body, request.headers, v2=v2)
            # The caller's trace (W3C traceparent) and request id follow the
            # request into mds's loop (serve_sync carries this thread's context).
            with (
                _tracing.continued(request.headers, server_span=span_name(v2, version is not None)),
                _logs.request_id(request_id(call, request.headers.get("X-Request-Id"))),
                use_request_context(call.context),
            ):
                if call.streams:
                    return self._stream(call)  # the first chunk is fetched in here
                target = call.target
                if call.rows is None:
                    result = target.serve_sync(
                        call.payload, timeout=call.timeout, priority=call.priority
                    )
                else:
                    result = target.serve_many_sync(
                        call.rows, timeout=call.timeout, priority=call.priority
                    )
            reply = service.reply(call, result)
        except Exception as exc:
            reply = service.error(exc)
        return self._response(reply)

    def _stream(self, call: Call) -> Response:
        service = self.service
        chunks = call.target.stream_sync(call.payload, timeout=call.timeout, priority=call.priority)
        try:
            first = next(chunks, _END)
        except Exception as exc:
            return self._response(service.error(exc))

        def events() -> Iterator[bytes]:
            try:
                if first is _END:
                    return
                yield service.stream_event(call, first)
                while True:
                    # Each chunk is fetched with the request's context (never
                    # set across a yield: the server resumes this generator).
                    with use_request_context(call.context):
                        chunk = next(chunks, _END)
                    if chunk is _END:
                        break
                    yield service.stream_event(call, chunk)
            except Exception as exc:
                yield service.error_event(exc)
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()

        response: Response = self.flask.Response(
            events(), status=200, content_type="text/event-stream; charset=utf-8"
        )
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"
        response.headers[VERSION_HEADER] = call.target.version
        return response
