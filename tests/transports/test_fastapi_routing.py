"""mds's routes in a FastAPI app: served past the router, never where the router would differ.

``mds.fastapi.add_routes`` puts mds's routes ahead of FastAPI's own pages
and serves them from the app's innermost middleware; every answer must be
the one the router gives without that lane (each case is checked against
the same app with the lane taken out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

import mds

pytest.importorskip("fastapi")
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import mds.fastapi

V2_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}


class Echo(mds.ModelHandler[Any, Any]):
    def infer(self, batch: list[Any]) -> list[Any]:
        return list(batch)


async def mine(request: Any) -> JSONResponse:
    return JSONResponse({"mine": request.url.path})


Setup = Callable[[FastAPI], None]


def build(setup: Setup, *, lane: bool = True, **options: Any) -> FastAPI:
    """An app with ``setup``'s routes, then mds's; ``lane=False``: the router alone."""
    runtime = mds.Runtime()
    runtime.add_model("m", Echo)
    app = FastAPI(**options)
    setup(app)
    mds.fastapi.add_routes(app, runtime, load="wait")
    if not lane:
        app.user_middleware = [m for m in app.user_middleware if "Lane" not in repr(m.cls)]
    return app


Requests = list[tuple[str, str]]


def answers(
    setup: Setup, requests: Requests, *, lane: bool, after: Setup | None, **options: Any
) -> list[tuple[int, str]]:
    app = build(setup, lane=lane, **options)
    with TestClient(app) as client:
        assert client.get("/health/live").status_code == 200  # the stack is built
        if after is not None:
            after(app)
        replies = [
            client.request(m, p, json=V2_BODY if m == "POST" else None, follow_redirects=False)
            for m, p in requests
        ]
    return [(reply.status_code, reply.text) for reply in replies]


def same_as_router(
    setup: Setup, requests: Requests, after: Setup | None = None, **options: Any
) -> Iterator[str]:
    """Each request's answer with the lane, checked to be the router's alone."""
    lane = answers(setup, requests, lane=True, after=after, **options)
    router = answers(setup, requests, lane=False, after=after, **options)
    assert lane == router
    return (text for _, text in lane)


def nothing(app: FastAPI) -> None:
    pass


def own_live_and_infer(app: FastAPI) -> None:
    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"mine": "yes"}

    @app.post("/models/{anything}/infer")
    async def infer(anything: str) -> dict[str, str]:
        return {"theirs": anything}


def test_the_apps_routes_ahead_of_mds_keep_their_paths() -> None:
    requests = [
        ("GET", "/health/live"),  # the app's
        ("POST", "/health/live"),  # the app's takes GET only: mds's 405
        ("POST", "/models/m/infer"),  # the app's pattern
        ("POST", "/v2/models/m/infer"),  # mds's
        ("GET", "/v2/health/live/"),  # the router's redirect
    ]
    live, refused, infer, v2, slash = same_as_router(own_live_and_infer, requests)
    assert '"mine"' in live and '"theirs"' in infer and '"outputs"' in v2
    assert "GET" in refused and "405" not in slash


def test_fastapis_pages_move_only_where_no_route_takes_their_paths() -> None:
    def slug(app: FastAPI) -> None:
        @app.get("/{slug}")
        async def page(slug: str) -> dict[str, str]:
            return {"slug": slug}

    # FastAPI's page at one of mds's paths stays ahead of mds's route.
    (models,) = same_as_router(nothing, [("GET", "/models")], docs_url="/models")
    assert "<html>" in models
    requests = [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/redoc")]
    for text in [*same_as_router(slug, requests), *same_as_router(nothing, requests)]:
        assert not text.startswith('{"slug"') and ("<html>" in text or '"openapi"' in text)


def test_routes_changed_after_start_are_followed() -> None:
    def replace_ahead(app: FastAPI) -> None:
        (at,) = [i for i, r in enumerate(app.router.routes) if getattr(r, "path", "") == "/hello"]
        app.router.routes[at] = Route("/models/{name}/infer", mine, methods=["POST"])

    def hello(app: FastAPI) -> None:
        app.add_route("/hello", mine)

    def swap_statistics(app: FastAPI) -> None:
        app.router.routes[:] = [r for r in app.router.routes if r.path != "/statistics"]
        app.router.routes.append(Route("/statistics", mine))

    def between(app: FastAPI) -> None:
        paths = [getattr(r, "path", "") for r in app.router.routes]
        app.router.routes.insert(paths.index("/health/live"), Route("/health/live", mine))

    (replaced,) = same_as_router(hello, [("POST", "/models/m/infer")], after=replace_ahead)
    (swapped,) = same_as_router(nothing, [("GET", "/statistics")], after=swap_statistics)
    (inserted,) = same_as_router(nothing, [("GET", "/health/live")], after=between)
    assert all('"mine"' in text for text in (replaced, swapped, inserted))


def test_a_path_the_routers_patterns_read_differently_goes_to_the_router() -> None:
    def fixed(app: FastAPI) -> None:
        app.add_route("/models/m", mine)  # Starlette's "$" matches before a final newline

    (text,) = same_as_router(fixed, [("GET", "/models/m%0A")])
    assert '"mine"' in text


def test_the_lane_serves_mds_routes_past_the_router_after_the_apps_middleware(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str] = []
    asked: list[str] = []
    matches = Route.matches

    def counted(route: Route, scope: Any) -> Any:
        asked.append(route.path)
        return matches(route, scope)

    def tagged(app: FastAPI) -> None:
        @app.middleware("http")
        async def tag(request: Any, call_next: Any) -> Any:
            response = await call_next(request)
            seen.append(request.scope["route"].path)  # set as the router sets it
            response.headers["x-tag"] = "yes"
            return response

    app = build(tagged)
    outer = Starlette(routes=[Mount("/outer", app)])
    with TestClient(app) as client:
        monkeypatch.setattr(Route, "matches", counted)
        reply = client.post("/v2/models/m/infer", json=V2_BODY)
        assert reply.status_code == 200 and reply.headers["x-tag"] == "yes", reply.text
        assert asked == []  # no route was asked: the router never saw it
        assert seen == ["/v2/models/{name}/infer"]
        mounted = TestClient(outer)  # the path less the mount's root; the runtime runs
        assert mounted.get("/outer/v2/health/live").json() == {"live": True}
