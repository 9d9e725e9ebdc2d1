"""A lane past a Starlette (FastAPI) app's router for mds's routes.

The router tries the app's routes one by one, behind FastAPI's exception
and exit-stack layers; on one core that is a fifth of an inference
request's CPU. The lane is the app's innermost middleware: the app's own
middleware (auth, CORS, logging) has run when it sees a request, and it
answers only what the router would have sent to one of mds's routes: the
same path, with no route of the app's ahead of mds's taking it. The rest
goes on to the router, as does every request FastAPI's own telemetry
follows (it names its spans by the route the router picks).
"""

from __future__ import annotations

from typing import Any

from .asgi import Receive, Scope, Send
from .endpoints import Dispatch
from .matching import PathTable, route_path

__all__ = ["Lane"]


class Lane:
    """ASGI middleware: mds's paths to their dispatch, anything else to ``app``.

    Args:
        app: the rest of the app's stack (its exception layer, its router).
        router: the app's router, whose routes are checked for any ahead of
            mds's that would take a path.
        ours: mds's routes, as added to ``router``, each a Starlette ``Route``
            whose endpoint is a :class:`Dispatch`.
    """

    def __init__(self, app: Any, *, router: Any, ours: list[Any]) -> None:
        from starlette.routing import Match

        self.app = app
        self._full = Match.FULL
        self._router = router
        self._ours = ours
        self._table: PathTable[Dispatch] = PathTable({r.path: r.endpoint for r in ours})
        # Where mds's first route was last seen in the router, and the routes
        # ahead of it: plain paths by path, and the patterns (checked in turn).
        self._seen: tuple[int, Any] = (-1, None)
        self._fixed: dict[str, list[Any]] = {}
        self._patterns: list[Any] = []
        self._gone = False  # mds's routes are no longer in the router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("fastapi.telemetry") is None:
            path = route_path(scope)
            found = self._table.find(path)
            if found is not None and not self._taken_ahead(path, scope):
                dispatch, params = found
                merged = dict(scope.get("path_params", ()))
                merged.update(params)
                scope["path_params"] = merged  # as the route would have set them
                await dispatch(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _taken_ahead(self, path: str, scope: Scope) -> bool:
        """Whether a route the router tries before mds's takes this request (the router decides)."""
        self._look()
        if self._gone:
            return True
        for route in self._fixed.get(path, ()):
            if route.matches(scope)[0] is self._full:
                return True
        return any(route.matches(scope)[0] is self._full for route in self._patterns)

    def _look(self) -> None:
        """Find mds's routes in the router again if routes were added or removed ahead of them."""
        routes = self._router.routes
        index, first = self._seen
        if index < len(routes) and routes[index] is first:
            return
        ours = {id(route) for route in self._ours}
        index = next((i for i, route in enumerate(routes) if id(route) in ours), -1)
        self._gone = index < 0
        self._seen = (index, routes[index] if index >= 0 else None)
        self._fixed, self._patterns = {}, []
        plain = _plain_route_types()
        for route in routes[: max(index, 0)]:
            if type(route) in plain and not route.param_convertors:
                self._fixed.setdefault(route.path, []).append(route)
            else:  # a pattern, a mount, or a route class of the app's own: asked each time
                self._patterns.append(route)


def _plain_route_types() -> tuple[type, ...]:
    """The route classes whose path without parameters matches only itself."""
    from starlette.routing import Route

    try:
        from fastapi.routing import APIRoute
    except ImportError:  # a Starlette app
        return (Route,)
    return (Route, APIRoute)
