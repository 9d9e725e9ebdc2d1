"""Real servers for the transport tests: uvicorn with FastAPI, werkzeug with Flask.

Each server gets its own runtime, built from the same models, and serves it
on a free loopback port for the whole module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

import mds

try:  # the optional parts these tests need; the test modules skip without them
    import torch
except ImportError:  # pragma: no cover - core-only installs
    torch = None


class Echo(mds.ModelHandler[Any, Any]):
    """Gives back what it was sent: every codec, both ways."""

    def infer(self, batch: Sequence[Any]) -> list[Any]:
        return list(batch)


class Linear(mds.ModelHandler[list[float], dict[str, list[float]]]):
    """A real torch layer: 4 features in, 2 scores out; rejects other lengths."""

    def init(self, context: mds.ModelContext) -> None:
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 2).eval()

    def preprocess(self, request: list[float]) -> Any:
        if len(request) != 4:
            raise ValueError(f"expected 4 features, got {len(request)}")
        return torch.tensor(request, dtype=torch.float32)

    def infer(self, batch: Sequence[Any]) -> list[Any]:
        with torch.inference_mode():
            return list(self.layer(torch.stack(list(batch))))

    def postprocess(self, output: Any) -> dict[str, list[float]]:
        return {"scores": output.tolist()}


def linear_reference(features: list[float]) -> list[float]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 2).eval()
    with torch.inference_mode():
        result: list[float] = layer(torch.tensor(features, dtype=torch.float32)).tolist()
    return result


class Slow(mds.ModelHandler[float, float]):
    """Sleeps for the number of seconds it is sent, one request at a time."""

    async def infer(self, batch: Sequence[float]) -> list[float]:
        await anyio.sleep(max(batch))
        return list(batch)


class Fails(mds.ModelHandler[Any, Any]):
    def infer(self, batch: Sequence[Any]) -> list[Any]:
        raise RuntimeError("the model's weights are gone (secret internals)")


class Words(mds.ModelHandler[str, str]):
    """Streams its text back a word at a time; a word 'boom' fails the stream there."""

    def infer(self, batch: Sequence[str]) -> list[str]:
        return list(batch)

    def postprocess(self, output: str) -> Iterator[str]:
        for word in output.split():
            if word == "boom":
                raise ValueError("the stream broke at 'boom'")
            yield word


class AsyncWords(Words):
    async def postprocess(self, output: str) -> AsyncIterator[str]:  # type: ignore[override]
        for word in output.split():
            yield word.upper()


class Broken(mds.ModelHandler[Any, Any]):
    def init(self, context: mds.ModelContext) -> None:
        raise OSError("no weights at /models/broken")

    def infer(self, batch: Sequence[Any]) -> list[Any]:
        return list(batch)


def make_runtime(onnx_model: bytes) -> mds.Runtime:
    runtime = mds.Runtime(fail_fast=False)
    batched = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=8, max_queue_delay=0.005))
    runtime.add_model("echo", Echo)
    runtime.add_model("linear", Linear, batched)
    runtime.add_model(
        "onnx",
        lambda: mds.OnnxHandler(onnx_model),
        batched,
    )
    runtime.add_model(
        "slow",
        Slow,
        mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=1, max_queue_size=1)),
    )
    runtime.add_model(
        "fails", Fails, mds.ModelConfig(batching=mds.BatchingConfig(isolate_failures=False))
    )
    runtime.add_model("words", Words)
    runtime.add_model("async_words", AsyncWords)
    runtime.add_model("broken", Broken)
    runtime.add_pipeline(
        mds.Pipeline(
            "scored",
            [
                mds.Node.function("features", lambda r: r["features"]),
                mds.Node.model("score", model="linear"),
            ],
        )
    )
    return runtime


def _two_inputs() -> Any:
    """A torch module: float features shifted by an integer id; two inputs, two outputs."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 2)

    class TwoInputs(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.linear = linear

        def forward(self, x: Any, ids: Any) -> tuple[Any, Any]:
            scores = self.linear(x) + ids.float().unsqueeze(1)
            return scores, scores.argmax(dim=1)

    return TwoInputs().eval()


@pytest.fixture(scope="session")
def onnx_model() -> bytes:
    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _two_inputs(),
            (torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64)),
            buffer,
            input_names=["x", "ids"],
            output_names=["scores", "best"],
            dynamic_axes={"x": {0: "batch"}, "ids": {0: "batch"}},
            dynamo=False,
        )
    return buffer.getvalue()


def onnx_reference(x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        scores, best = _two_inputs()(torch.from_numpy(x), torch.from_numpy(ids))
    return scores.numpy(), best.numpy()


class Served:
    """A running server: its base URL, its runtime, and a client for it."""

    def __init__(self, kind: str, url: str, runtime: mds.Runtime) -> None:
        self.kind = kind
        self.url = url
        self.runtime = runtime
        self.client = httpx.Client(base_url=url, timeout=30)


def _fastapi_app(runtime: mds.Runtime, events: list[str]) -> Any:
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request

    import mds.fastapi

    @asynccontextmanager
    async def own_lifespan(app: Any) -> AsyncIterator[None]:
        events.append(f"app starts; mds running: {runtime.running}")
        yield
        events.append(f"app stops; mds running: {runtime.running}")

    app = FastAPI(lifespan=own_lifespan)

    @app.middleware("http")
    async def tag(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["x-own-middleware"] = "yes"
        return response

    @app.post("/mine")
    async def mine(body: dict[str, list[float]]) -> dict[str, Any]:
        return {"mine": await runtime.serve("linear", body["features"])}

    # Loaded before the server takes requests: these tests are about the routes.
    mds.fastapi.add_routes(app, runtime, prefix="/ml", max_body_bytes=100_000, load="wait")
    return app


def _flask_app(runtime: mds.Runtime) -> Any:
    from flask import Flask, request

    import mds.flask

    app = Flask(__name__)

    @app.after_request
    def tag(response: Any) -> Any:
        response.headers["x-own-middleware"] = "yes"
        return response

    @app.post("/mine")
    def mine() -> Any:
        return {"mine": runtime.serve_sync("linear", request.get_json()["features"])}

    mds.flask.add_routes(app, runtime, prefix="/ml", max_body_bytes=100_000, load="wait")
    return app


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fastapi_server(onnx_model: bytes) -> Iterator[tuple[Served, list[str]]]:
    runtime = make_runtime(onnx_model)
    events: list[str] = []
    import uvicorn

    port = _free_port()
    config = uvicorn.Config(
        _fastapi_app(runtime, events), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    served = Served("fastapi", f"http://127.0.0.1:{port}", runtime)
    yield served, events
    served.client.close()
    server.should_exit = True
    thread.join(30)
    # mds stopped with the app, after the app's own shutdown ran.
    assert events[-1] == "app stops; mds running: True"
    assert not runtime.running


@pytest.fixture(scope="module")
def flask_server(onnx_model: bytes) -> Iterator[Served]:
    from werkzeug.serving import make_server

    runtime = make_runtime(onnx_model)
    app = _flask_app(runtime)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    served = Served("flask", f"http://127.0.0.1:{server.server_port}", runtime)
    yield served
    served.client.close()
    server.shutdown()
    thread.join(30)
    runtime.stop_sync()


@pytest.fixture(params=["fastapi", "flask"])
def server(request: pytest.FixtureRequest) -> Served:
    """Each test that takes this runs against both adapters."""
    if request.param == "fastapi":
        served: Served = request.getfixturevalue("fastapi_server")[0]
        return served
    flask_served: Served = request.getfixturevalue("flask_server")
    return flask_served


@pytest.fixture(name="linear_reference")
def _linear_reference() -> Any:
    """The Linear model's scores computed directly with torch."""
    return linear_reference


@pytest.fixture(name="onnx_reference")
def _onnx_reference() -> Any:
    """The ONNX model's outputs computed directly with torch."""
    return onnx_reference
