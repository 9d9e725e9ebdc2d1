"""Client mistakes are 4xx, errors are bounded and say where, over real servers.

The models here are numpy only, so these tests need just the adapter under
test (FastAPI with uvicorn, or Flask) and Triton's official client.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pytest

import mds

from ..servers import Served, running

pytestmark = pytest.mark.slow

ROW = 4


class Doubling(mds.ModelHandler[Any, dict[str, Any]]):
    """``[4 numbers]`` → ``{"y": [...]}``, twice each; a row starting with 13 fails alone.

    It serves mds's JSON route (a list) and the protocol (named tensors ``x``
    and ``y``) as one model; it records the size of each batch.
    """

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def signature(self) -> Any:
        spec = mds.TensorSpec
        return (
            {"x": spec(name="x", dtype="float32", shape=(ROW,))},
            {"y": spec(name="y", dtype="float32", shape=(ROW,))},
        )

    async def preprocess(self, request: Any) -> np.ndarray:
        x = np.asarray(request, dtype=np.float32)
        if x.shape != (ROW,):
            raise mds.InvalidInput(f"expected {ROW} numbers, got shape {x.shape}")
        return x

    def infer(self, batch: Sequence[np.ndarray]) -> list[Any]:
        self.sizes.append(len(batch))
        return [
            mds.InferenceError(f"row value {x[0]:g} is unlucky") if x[0] == 13 else x * 2
            for x in batch
        ]

    async def postprocess(self, y: np.ndarray) -> dict[str, Any]:
        return {"y": y.tolist()}

    def from_tensors(self, tensors: dict[str, Any]) -> Any:
        return tensors["x"]

    def to_tensors(self, response: dict[str, Any]) -> Any:
        return {"y": np.asarray(response["y"], dtype=np.float32)}


class Special(mds.ModelHandler[Any, Any]):
    """Answers NaN, infinities and a plain number."""

    def infer(self, batch: Sequence[Any]) -> list[Any]:
        return [np.array([np.nan, np.inf, -np.inf, 1.5], dtype=np.float32) for _ in batch]


class Chatty(mds.ModelHandler[Any, Any]):
    """Its errors quote the whole request: a client's huge body must not come back whole."""

    def preprocess(self, request: Any) -> Any:
        if request == "raise-mds":
            raise mds.InvalidInput("no: " + "x" * 50_000_000)
        raise ValueError(f"cannot read {request!r}")

    def infer(self, batch: Sequence[Any]) -> list[Any]:
        return list(batch)


class SlowToLoad(mds.ModelHandler[Any, Any]):
    """Its init waits until the test lets it finish loading."""

    gate = threading.Event()

    def init(self, context: mds.ModelContext) -> None:
        assert self.gate.wait(60)

    def infer(self, batch: Sequence[Any]) -> list[Any]:
        return list(batch)


def make_runtime() -> mds.Runtime:
    runtime = mds.Runtime()
    batching = mds.BatchingConfig(max_batch_size=16, max_queue_delay=0.005, max_queue_size=16)
    runtime.add_model("doubling", Doubling, mds.ModelConfig(batching=batching))
    runtime.add_model("special", Special)
    runtime.add_model("chatty", Chatty)
    return runtime


def wait_for(check: Any, seconds: float = 60) -> None:
    """Poll ``check()`` as a probe would until it is true."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


def fastapi_app(runtime: mds.Runtime, **options: Any) -> Any:
    from fastapi import FastAPI

    import mds.fastapi

    app = FastAPI()

    @app.post("/own/{kind}")
    async def own(kind: str) -> Any:
        return await own_route(kind)

    mds.fastapi.add_routes(app, runtime, **options)
    return app


def flask_app(runtime: mds.Runtime, **options: Any) -> Any:
    from flask import Flask

    import mds.flask

    app = Flask(__name__)

    @app.post("/own/<kind>")
    def own(kind: str) -> Any:
        return own_sync(kind)

    mds.flask.add_routes(app, runtime, **options)
    return app


# What the apps' own routes do: call mds, or fail as mds fails.
RAISES: dict[str, type[mds.MdsError]] = {
    "overloaded": mds.Overloaded,
    "not-ready": mds.NotReady,
    "deadline": mds.DeadlineExceeded,
    "inference": mds.InferenceError,
}


async def own_route(kind: str) -> Any:
    if kind in RAISES:
        raise RAISES[kind]("as mds would", model="doubling", version="1")
    if kind == "unknown":
        return await mds.serve("nothing", [1, 2, 3, 4])
    return await mds.serve("doubling", [1, 2] if kind == "bad" else [1, 2, 3, 4])


def own_sync(kind: str) -> Any:
    if kind in RAISES:
        raise RAISES[kind]("as mds would", model="doubling", version="1")
    if kind == "unknown":
        return mds.serve_sync("nothing", [1, 2, 3, 4])
    return mds.serve_sync("doubling", [1, 2] if kind == "bad" else [1, 2, 3, 4])


@contextmanager
def serving(kind: str, runtime: mds.Runtime, **options: Any) -> Iterator[Served]:
    """``runtime`` behind a real server: uvicorn + FastAPI, or werkzeug + Flask."""
    pytest.importorskip(kind)
    if kind == "fastapi":
        pytest.importorskip("uvicorn")
    app = fastapi_app(runtime, **options) if kind == "fastapi" else flask_app(runtime, **options)
    with running(kind, app, runtime) as served:
        yield served


@pytest.fixture(scope="module", params=["fastapi", "flask"])
def server(request: pytest.FixtureRequest) -> Iterator[Served]:
    """Each test that takes this runs against both adapters, models loaded first."""
    with serving(request.param, make_runtime(), load="wait") as served:
        yield served


def error_of(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert response.status_code == status, response.text[:500]
    body: dict[str, Any] = response.json()
    assert body["type"] == kind, body
    return body


def v2_json(name: str, shape: list[Any], datatype: str, data: Any) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


def v2_binary(
    name: str, shape: list[Any], datatype: str, raw: bytes
) -> tuple[bytes, dict[str, str]]:
    tensor = {
        "name": name,
        "shape": shape,
        "datatype": datatype,
        "parameters": {"binary_data_size": len(raw)},
    }
    head = json.dumps({"inputs": [tensor]}).encode()
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(head)),
    }
    return head + raw, headers


# -- client mistakes are 400s that say what was wrong --------------------------

DEEP = b"[" * 100_000 + b"1" + b"]" * 100_000
SHAPE_PROBLEMS: list[tuple[str, list[Any], str]] = [
    ("too many dimensions", [1] * 70, "70 dimensions; a tensor has at most 32"),
    ("more elements than any tensor", [2**40, 2**40], "too large for any tensor"),
    ("too large even when empty", [0, 2**62, 2**62], "too large for any tensor"),
    ("a negative dimension", [2, -1], "negative dimension"),
]
VALUE_PROBLEMS: list[tuple[str, str, Any, str]] = [
    ("FP16 overflow", "FP16", [1.0, 2.0, 70000.0, 4.0], "70000.0 at 2 (row-major) is out of FP16"),
    ("FP32 overflow", "FP32", [1.0, 2.0, 3.0, 1e39], "out of FP32's range"),
    ("a fraction for INT32", "INT32", [1, 2, 3.5, 4], "INT32 data must be whole numbers, got 3.5"),
    ("a bool for INT64", "INT64", [1, True, 3, 4], "got True (bool) at 1"),
    ("300 for UINT8", "UINT8", [1, 2, 300, 4], "300 is out of UINT8's range (0 to 255)"),
    ("a string for FP32", "FP32", [1, "2", 3, 4], "FP32 data must be numbers, got '2' (str)"),
]


@pytest.mark.parametrize(
    ("case", "shape", "problem"), SHAPE_PROBLEMS, ids=[c[0] for c in SHAPE_PROBLEMS]
)
def test_shapes_no_tensor_can_have_are_400s_json_and_binary(
    server: Served, case: str, shape: list[Any], problem: str
) -> None:
    url = "/v2/models/doubling/infer"
    response = server.client.post(url, json=v2_json("x", shape, "FP32", []))
    body = error_of(response, 400, "DecodeError")
    assert problem in body["error"] and "input 'x'" in body["error"]
    assert body["model"] == "doubling"
    raw, headers = v2_binary("x", shape, "FP32", b"")
    body = error_of(server.client.post(url, content=raw, headers=headers), 400, "DecodeError")
    assert problem in body["error"]


@pytest.mark.parametrize(
    ("case", "datatype", "data", "problem"), VALUE_PROBLEMS, ids=[c[0] for c in VALUE_PROBLEMS]
)
def test_values_that_do_not_fit_the_datatype_are_refused(
    server: Served, case: str, datatype: str, data: Any, problem: str
) -> None:
    response = server.client.post(
        "/v2/models/doubling/infer", json=v2_json("x", [ROW], datatype, data)
    )
    body = error_of(response, 400, "DecodeError")
    assert problem in body["error"], body["error"]


def test_json_nested_too_deeply_is_a_400_on_both_routes(server: Served) -> None:
    headers = {"content-type": "application/json"}
    response = server.client.post("/models/doubling/infer", content=DEEP, headers=headers)
    assert "nested too deeply" in error_of(response, 400, "DecodeError")["error"]
    response = server.client.post("/v2/models/doubling/infer", content=DEEP, headers=headers)
    assert "does not fit the protocol" in error_of(response, 400, "DecodeError")["error"]
    inside = b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ' + DEEP + b"}]}"
    response = server.client.post("/v2/models/doubling/infer", content=inside, headers=headers)
    assert "nested too deeply" in error_of(response, 400, "DecodeError")["error"]
    # Nothing was lost: the server goes on.
    answer = server.client.post("/models/doubling/infer", json=[1, 2, 3, 4])
    assert answer.json() == {"y": [2.0, 4.0, 6.0, 8.0]}


def test_inputs_are_checked_per_row_before_the_batch(server: Served) -> None:
    url = "/v2/models/doubling/infer"
    cases = [
        (v2_json("x", [3], "FP32", [1, 2, 3]), "input 'x': expected shape (4)"),
        (
            v2_json("x", [ROW], "FP64", [1, 2, 3, 4]),
            "input 'x': expected dtype float32, got float64",
        ),
        (v2_json("x", [2, 2, ROW], "FP32", [0] * 16), "got x (2, 2, 4) for (4)"),
        (v2_json("y", [ROW], "FP32", [1, 2, 3, 4]), "the model has no input 'y'"),
    ]
    for request, problem in cases:
        body = error_of(server.client.post(url, json=request), 400, "InvalidInput")
        assert problem in body["error"], body["error"]
        assert (body["model"], body["version"]) == ("doubling", "1")


# -- bounded error bodies ------------------------------------------------------


def test_error_bodies_are_bounded_whatever_they_quote(server: Served) -> None:
    huge = "z" * 10_000_000
    response = server.client.post("/models/chatty/infer", json=huge)
    body = error_of(response, 400, "InvalidInput")
    assert len(response.content) < 5_000
    assert "cannot read 'zzz" in body["error"] and "characters in all" in body["error"]
    # A handler's own exception text, 50 MB of it.
    response = server.client.post("/models/chatty/infer", json="raise-mds")
    body = error_of(response, 400, "InvalidInput")
    assert len(response.content) < 5_000
    assert body["error"].endswith("characters in all)")
    # An unknown input name the size of the body is quoted by its start.
    request = v2_json("n" * 1_000_000, [ROW], "FP32", [1, 2, 3, 4])
    response = server.client.post("/v2/models/doubling/infer", json=request)
    assert len(error_of(response, 400, "InvalidInput")["error"]) < 1_000


# -- outputs JSON cannot write -------------------------------------------------


def test_more_rows_than_the_model_can_queue_are_refused_at_once(server: Served) -> None:
    rows = np.zeros((17, ROW), np.float32)  # doubling queues at most 16
    request = v2_json("x", [17, ROW], "FP32", rows.ravel().tolist())
    response = server.client.post("/v2/models/doubling/infer", json=request)
    body = error_of(response, 400, "InvalidInput")
    assert "the request has 17 rows; the model queues at most 16" in body["error"]


def test_nan_and_infinities_read_back_through_tritonclient(server: Served) -> None:
    client = pytest.importorskip("tritonclient.http")
    triton = client.InferenceServerClient(server.url.removeprefix("http://"))
    data = np.zeros((1,), dtype=np.float32)
    for binary in (False, True):
        given = client.InferInput("x", [1], "FP32")
        given.set_data_from_numpy(data, binary_data=binary)
        asked = client.InferRequestedOutput("output0", binary_data=binary)
        result = triton.infer("special", inputs=[given], outputs=[asked])
        back = result.as_numpy("output0")
        assert back.dtype == np.float32
        np.testing.assert_array_equal(back, [np.nan, np.inf, -np.inf, 1.5])
    triton.close()


# -- a batch axis, as Triton's clients send ---------------------------------------


def test_rows_are_served_through_the_batcher_and_joined_in_order(server: Served) -> None:
    client = pytest.importorskip("tritonclient.http")
    triton = client.InferenceServerClient(server.url.removeprefix("http://"))
    rows = np.arange(8 * ROW, dtype=np.float32).reshape(8, ROW)
    for count in (1, 8):
        for binary in (False, True):
            given = client.InferInput("x", [count, ROW], "FP32")
            given.set_data_from_numpy(rows[:count], binary_data=binary)
            result = triton.infer(
                "doubling",
                inputs=[given],
                outputs=[client.InferRequestedOutput("y", binary_data=binary)],
            )
            np.testing.assert_array_equal(result.as_numpy("y"), rows[:count] * 2)
            assert result.get_response()["model_version"] == "1"
    # A row that fails fails the request, and says which.
    poisoned = rows.copy()
    poisoned[[2, 5], 0] = 13
    given = client.InferInput("x", [8, ROW], "FP32")
    given.set_data_from_numpy(poisoned)
    with pytest.raises(Exception) as failed:  # tritonclient's InferenceServerException
        triton.infer("doubling", inputs=[given])
    message = str(failed.value)
    assert "2 of 8 rows failed" in message and "row 2:" in message and "row 5:" in message
    assert "unlucky" in message
    triton.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # aiohttp runs on asyncio
async def test_rows_through_tritonclients_aio_client(server: Served, anyio_backend: str) -> None:
    aio = pytest.importorskip("tritonclient.http.aio")
    http = pytest.importorskip("tritonclient.http")
    triton = aio.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        assert await triton.is_model_ready("doubling")
        rows = np.arange(6 * ROW, dtype=np.float32).reshape(6, ROW)
        given = http.InferInput("x", [6, ROW], "FP32")
        given.set_data_from_numpy(rows, binary_data=True)
        result = await triton.infer("doubling", inputs=[given])
        np.testing.assert_array_equal(result.as_numpy("y"), rows * 2)
        metadata = await triton.get_model_metadata("doubling")
        assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [ROW]}]
    finally:
        await triton.close()


def test_one_handler_serves_both_routes(server: Served) -> None:
    json_route = server.client.post("/models/doubling/infer", json=[1, 2, 3, 4])
    assert json_route.json() == {"y": [2.0, 4.0, 6.0, 8.0]}
    request = v2_json("x", [ROW], "FP32", [1, 2, 3, 4])
    (output,) = server.client.post("/v2/models/doubling/infer", json=request).json()["outputs"]
    assert output == {"name": "y", "shape": [ROW], "datatype": "FP32", "data": [2, 4, 6, 8]}
    stats = server.client.get("/statistics").json()
    assert stats["doubling"]["completed"] >= 2  # one model, one batcher, both routes


# -- methods, and the apps' own routes ----------------------------------------


def test_a_wrong_method_is_a_405_in_mds_shape_with_allow(server: Served) -> None:
    for method, path, allow in [
        ("GET", "/models/doubling/infer", "OPTIONS, POST"),
        ("DELETE", "/v2/models/doubling/infer", "OPTIONS, POST"),
        ("POST", "/health/ready", "GET, HEAD, OPTIONS"),
        ("PUT", "/v2/models/doubling", "GET, HEAD, OPTIONS"),
    ]:
        response = server.client.request(method, path)
        body = error_of(response, 405, "MethodNotAllowed")
        assert response.headers["allow"] == allow
        assert body["error"].startswith(f"{method} is not allowed here")
    options = server.client.request("OPTIONS", "/models/doubling/infer")
    assert options.status_code == 200 and options.headers["allow"] == "OPTIONS, POST"
    assert server.client.head("/health/live").status_code == 200
    # Methods no route of any app takes, on an mds path: mds's 405 too.
    for method in ("TRACE", "PROPFIND"):
        response = server.client.request(method, "/models/doubling/infer")
        assert error_of(response, 405, "MethodNotAllowed")["error"].startswith(method)
        assert response.headers["allow"] == "OPTIONS, POST"
    # The app's own paths keep its framework's answer.
    assert server.client.request("TRACE", "/own/bad").status_code == 405


@pytest.mark.parametrize(
    ("kind", "status", "error"),
    [
        ("bad", 400, "InvalidInput"),
        ("unknown", 404, "ModelNotFound"),
        ("overloaded", 429, "Overloaded"),
        ("not-ready", 503, "NotReady"),
        ("deadline", 504, "DeadlineExceeded"),
        ("inference", 500, "InferenceError"),
    ],
)
def test_the_apps_own_routes_answer_mds_errors_from_the_same_table(
    server: Served, kind: str, status: int, error: str
) -> None:
    response = server.client.post(f"/own/{kind}")
    body = error_of(response, status, error)
    assert ("retry-after" in response.headers) == (status in (429, 503))
    if kind == "bad":
        assert body["error"] == "model 'doubling' (version 1): expected 4 numbers, got shape (2,)"
    assert server.client.post("/own/fine").json() == {"y": [2.0, 4.0, 6.0, 8.0]}


# -- loading in the background --------------------------------------------------


@pytest.mark.parametrize("kind", ["fastapi", "flask"])
def test_a_server_answers_probes_while_its_models_load(kind: str) -> None:
    SlowToLoad.gate.clear()
    runtime = mds.Runtime()
    runtime.add_model("slow", SlowToLoad)
    with serving(kind, runtime) as served:  # the default: load in the background
        client = served.client
        assert client.get("/health/live").status_code == 200
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        assert ready.json()["models"]["slow"]["state"] == "loading"
        refused = error_of(client.post("/models/slow/infer", json=1), 503, "NotReady")
        assert "it is loading" in refused["error"]
        SlowToLoad.gate.set()
        wait_for(lambda: client.get("/health/ready").status_code == 200)
        assert client.post("/models/slow/infer", json=1).json() == 1
