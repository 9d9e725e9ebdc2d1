"""What only a live server shows: lifespan, disconnects, many clients at once."""

from __future__ import annotations

import json
import socket
from typing import Any

import anyio
import httpx
import pytest

from .conftest import wait_for_statistics

pytestmark = pytest.mark.slow


def test_the_runtime_follows_the_apps_lifespan(fastapi_server: Any) -> None:
    served, events = fastapi_server
    # mds started before the app's own lifespan ran, so its startup could use the models.
    assert events[0] == "app starts; mds running: True"
    assert served.runtime.running


def _stats(served: Any, model: str) -> dict[str, Any]:
    result: dict[str, Any] = served.client.get("/ml/statistics").json()[model]
    return result


def test_a_client_that_disconnects_cancels_its_request(fastapi_server: Any) -> None:
    served, _ = fastapi_server
    before = _stats(served, "slow")
    with httpx.Client(base_url=served.url) as busy:
        # Keep the model busy for a while...
        import threading

        first = threading.Thread(
            target=lambda: busy.post("/ml/models/slow/infer", json=3.0), daemon=True
        )
        first.start()
        wait_for_statistics(served, "slow", lambda s: s["in_flight"] == 1 and s["queued"] == 0)
        # ...queue a request behind it, and hang up before it is answered.
        host, port = served.url.removeprefix("http://").split(":")
        body = json.dumps(0.5).encode()
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                b"POST /ml/models/slow/infer HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            wait_for_statistics(served, "slow", lambda s: s["queued"] == 1)
        wait_for_statistics(served, "slow", lambda s: s["cancelled"] > before["cancelled"])
        first.join(30)
    after = _stats(served, "slow")
    assert after["cancelled"] == before["cancelled"] + 1
    # The queued request left the queue and was never computed.
    assert after["batched_items"] == before["batched_items"] + 1
    assert after["queued"] == 0


def test_a_client_that_leaves_a_stream_closes_it(fastapi_server: Any) -> None:
    served, _ = fastapi_server
    with served.client.stream("POST", "/ml/models/words/infer", json="a b c d") as response:
        first = next(response.iter_lines())
    assert first == 'data: "a"'
    assert served.client.get("/ml/health/live").status_code == 200


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_many_clients_at_once(
    fastapi_server: Any, anyio_backend: str, linear_reference: Any
) -> None:
    served, _ = fastapi_server
    expected = {i: linear_reference([float(i), 1.0, 0.0, -1.0]) for i in range(200)}
    failures: list[str] = []
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=30) as client:

        async def one(i: int) -> None:
            if i % 10 == 3:  # some bad requests among the good
                response = await client.post("/ml/models/linear/infer", json=[1.0])
                if response.status_code != 400:
                    failures.append(f"{i}: {response.status_code}")
                return
            if i % 10 == 7:  # some that give up early
                with anyio.move_on_after(0.001):
                    await client.post("/ml/models/linear/infer", json=[1.0, 2.0, 3.0, 4.0])
                return
            response = await client.post("/ml/models/linear/infer", json=[float(i), 1.0, 0.0, -1.0])
            scores = response.json()["scores"]
            if any(abs(a - b) > 1e-4 for a, b in zip(scores, expected[i], strict=True)):
                failures.append(f"{i}: {scores} != {expected[i]}")

        async with anyio.create_task_group() as tasks:
            for i in range(200):
                tasks.start_soon(one, i)
        assert failures == []
        stats = (await client.get("/ml/statistics")).json()["linear"]
        assert stats["batches"] < stats["batched_items"]  # they were batched
        assert (await client.get("/ml/health/live")).status_code == 200


def test_the_router_and_lifespan_on_their_own() -> None:
    pytest.importorskip("fastapi")
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    import mds
    import mds.fastapi

    class Upper(mds.ModelHandler[str, str]):
        async def infer(self, batch: list[str]) -> list[str]:
            return [text.upper() for text in batch]

    runtime = mds.Runtime()
    runtime.add_model("upper", Upper)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        async with mds.fastapi.lifespan(runtime, load="wait")(app):
            assert runtime.running
            yield

    app = FastAPI(lifespan=lifespan)
    app.include_router(mds.fastapi.router(runtime, v2=False), prefix="/api")
    with TestClient(app) as client:
        assert client.post("/api/models/upper/infer", json="hi").json() == "HI"
        assert client.get("/api/health/ready").status_code == 200
        assert client.get("/api/v2").status_code == 404  # v2=False
        assert client.get("/api/health/live").status_code == 200
    assert not runtime.running
    # Without a lifespan that starts it, the routes say so.
    with TestClient(FastAPI()) as bare:
        bare.app.include_router(mds.fastapi.router(runtime))  # type: ignore[attr-defined]
        response = bare.post("/models/upper/infer", json="hi")
        assert response.status_code == 503
        assert "not running" in response.json()["error"] or "not ready" in response.json()["error"]
        assert bare.get("/health/live").json() == {"live": False}


async def test_disconnects_cancel_on_asyncio_and_trio(anyio_backend: str) -> None:
    """The route as an ASGI server calls it, on either loop: the client leaves mid-request."""
    pytest.importorskip("fastapi")
    from fastapi import FastAPI

    import mds
    import mds.fastapi

    class Held(mds.ModelHandler[int, int]):
        def __init__(self) -> None:
            self.gate = anyio.Event()
            self.seen: list[int] = []

        async def infer(self, batch: list[int]) -> list[int]:
            self.seen.extend(batch)
            await self.gate.wait()
            return batch

    handler = Held()
    runtime = mds.Runtime()
    runtime.add_model("held", lambda: handler)
    app = FastAPI()
    app.include_router(mds.fastapi.router(runtime))

    def scope_for(body: bytes) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/models/held/infer",
            "raw_path": b"/models/held/infer",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"1")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }

    async def call(value: int, leave: anyio.Event) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": str(value).encode(), "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await app(scope_for(str(value).encode()), receive, send)
        return sent

    async with runtime:
        stays, leaves = anyio.Event(), anyio.Event()
        replies: dict[int, list[dict[str, Any]]] = {}

        async def run(value: int, leave: anyio.Event) -> None:
            replies[value] = await call(value, leave)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run, 1, stays)  # computing, held
            await anyio.wait_all_tasks_blocked()
            tasks.start_soon(run, 2, leaves)  # queued behind it
            await anyio.wait_all_tasks_blocked()
            leaves.set()  # its client hangs up
            for _ in range(500):  # on asyncio the cancel lands from a done-callback
                await anyio.wait_all_tasks_blocked()
                if runtime.model("held").statistics().cancelled:
                    break
                await anyio.sleep(0.01)
            assert runtime.model("held").statistics().cancelled == 1
            handler.gate.set()
        assert replies[2] == []  # nothing is sent to a client that left
        assert replies[1][0]["status"] == 200 and replies[1][1]["body"] == b"1"
        assert handler.seen == [1]  # the request whose client left was never computed
