"""A lane past a Starlette (FastAPI) app's router for mds's routes.

The router tries the app's routes one by one, behind FastAPI's exception
and exit-stack layers; on one core that was a fifth of an inference
request's CPU. The lane is the app's innermost middleware: the app's own
middleware (auth, CORS, logging) has run when it sees a request, and it
answers only what the router would have sent to one of mds's routes: the
same path, with no route of the app's ahead of that route taking it. The
rest goes on to the router, as does every request FastAPI's own telemetry
follows (it names its spans by the route the router picks).
"""

from __future__ import annotations

from typing import Any

from .asgi import Receive, Scope, Send
from .matching import PathTable, route_path

__all__ = ["Lane", "plain_route_types"]


class Lane:
    """ASGI middleware: mds's paths to their route's endpoint, anything else to ``app``.

    Args:
        app: the rest of the app's stack (its exception layer, its router).
        router: the app's router, whose routes are checked for any ahead of
            mds's that would take a request.
        ours: mds's routes, as added to ``router``: Starlette ``Route`` s
            whose endpoints take every method (they answer 405 themselves).
    """

    def __init__(self, app: Any, *, router: Any, ours: list[Any]) -> None:
        from starlette.routing import Match

        self.app = app
        self._full = Match.FULL
        self._router = router
        self._table: PathTable[Any] = PathTable({route.path: route for route in ours})
        self._ours = frozenset(id(route) for route in ours)  # the table holds them
        self._path = _route_path()
        self._state: _State | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("fastapi.telemetry") is None:
            path = self._path(scope)
            found = self._table.find(path)
            if found is not None and not self._taken(path, found[0], scope):
                route, params = found
                merged = dict(scope.get("path_params", ()))
                merged.update(params)
                # What the router would have set, for middleware that reads it after.
                scope["path_params"] = merged
                scope["endpoint"] = route.endpoint
                scope["route"] = route
                scope.setdefault("router", self._router)
                await route.endpoint(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _taken(self, path: str, route: Any, scope: Scope) -> bool:
        """Whether the router would not send this request to ``route``: left to the router."""
        state = self._state
        if state is None or self._router.routes != state.routes:  # the same objects: quick
            state = self._state = self._look()
        at = state.at.get(id(route))
        if at is None or path.endswith("\n"):  # removed; or a path only a pattern takes
            return True
        for where, other in state.fixed.get(path, ()):
            if where < at and other.matches(scope)[0] is self._full:
                return True
        for where, other in state.patterns:
            if where >= at:
                break
            if other.matches(scope)[0] is self._full:
                return True
        return False

    def _look(self) -> _State:
        """Where mds's routes and the app's stand in the router now."""
        state = _State(list(self._router.routes))
        plain = plain_route_types()
        for index, route in enumerate(state.routes):
            if id(route) in self._ours:
                state.at.setdefault(id(route), index)
            elif type(route) in plain and not route.param_convertors:
                state.fixed.setdefault(route.path, []).append((index, route))
            else:  # a pattern, a mount, or a route class of the app's own: asked each time
                state.patterns.append((index, route))
        return state


class _State:
    """The router's routes as looked at: where each of mds's stood, and the app's.

    The app's: plain paths by path, the rest (asked in turn) in order, each
    with where it stood. Made whole, then swapped in: a reader never sees
    half of it.
    """

    __slots__ = ("at", "fixed", "patterns", "routes")

    def __init__(self, routes: list[Any]) -> None:
        self.routes = routes
        self.at: dict[int, int] = {}
        self.fixed: dict[str, list[tuple[int, Any]]] = {}
        self.patterns: list[tuple[int, Any]] = []


def _route_path() -> Any:
    """The function the installed Starlette's router takes a request's path with."""
    try:
        from starlette._utils import get_route_path
    except ImportError:  # not where it was: the same rules, as Starlette 0.38 on has them
        return route_path
    return get_route_path


def plain_route_types() -> tuple[type, ...]:
    """The route classes whose path without parameters matches only itself."""
    from starlette.routing import Route

    try:
        from fastapi.routing import APIRoute
    except ImportError:  # a Starlette app
        return (Route,)
    return (Route, APIRoute)
