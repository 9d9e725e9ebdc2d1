"""Real servers for the transport tests: uvicorn with FastAPI, werkzeug with Flask.

Each server gets its own runtime, built from the same models, and serves it
on a free loopback port for the whole module.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anyio
import numpy as np
import pytest

import mds

from .. import accumulate, two_inputs
from ..servers import Served, running


class Echo(mds.ModelHandler[Any, Any]):
    """Gives back what it was sent: every codec, both ways."""

    def infer(self, batch: Sequence[Any]) -> list[Any]:
        return list(batch)


class Linear(mds.ModelHandler[list[float], dict[str, list[float]]]):
    """A linear layer in numpy: 4 features in, 2 scores out; rejects other lengths."""

    def preprocess(self, request: list[float]) -> Any:
        if len(request) != 4:
            raise ValueError(f"expected 4 features, got {len(request)}")
        return np.asarray(request, dtype=np.float32)

    def infer(self, batch: Sequence[Any]) -> list[Any]:
        return list(two_inputs.linear(np.stack(list(batch))))

    def postprocess(self, output: Any) -> dict[str, list[float]]:
        return {"scores": output.tolist()}


def linear_reference(features: list[float]) -> list[float]:
    result: list[float] = two_inputs.linear(np.asarray(features, np.float32)).tolist()
    return result


class Tensors(mds.ModelHandler[dict[str, Any], dict[str, Any]]):
    """The ONNX test model's twin in numpy, declaring its tensors as OnnxHandler does."""

    platform = "numpy"

    def signature(self) -> Any:
        spec = mds.TensorSpec
        return (
            {
                "x": spec(name="x", dtype="float32", shape=(4,)),
                "ids": spec(name="ids", dtype="int64", shape=()),
            },
            {
                "scores": spec(name="scores", dtype="float32", shape=(2,)),
                "best": spec(name="best", dtype="int64", shape=()),
            },
        )

    def infer(self, batch: Sequence[dict[str, Any]]) -> list[Any]:
        scores, best = two_inputs.reference(
            np.stack([item["x"] for item in batch]), np.stack([item["ids"] for item in batch])
        )
        return [{"scores": s, "best": b} for s, b in zip(scores, best, strict=True)]


def tensor_models() -> list[str]:
    """The models that declare the two-input signature: numpy always, ONNX if installed."""
    found = ["tensors"]
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        found.append("onnx")
    return found


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


def make_runtime() -> mds.Runtime:
    runtime = mds.Runtime(fail_fast=False)
    batched = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=8, max_queue_delay=0.005))
    runtime.add_model("echo", Echo)
    runtime.add_model("accumulate", accumulate.Accumulate, accumulate.STATEFUL)
    runtime.add_model("linear", Linear, batched)
    runtime.add_model("tensors", Tensors, batched)
    if "onnx" in tensor_models():
        onnx_model = two_inputs.onnx_bytes()
        runtime.add_model("onnx", lambda: mds.OnnxHandler(onnx_model), batched)
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


def onnx_reference(x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return two_inputs.reference(x, ids)


def wait_for_statistics(served: Any, model: str, check: Any, seconds: float = 20) -> dict[str, Any]:
    """Poll ``/ml/statistics`` until ``check(stats of model)`` holds; those stats."""
    deadline = time.monotonic() + seconds
    while True:
        stats: dict[str, Any] = served.client.get("/ml/statistics").json()[model]
        if check(stats):
            return stats
        assert time.monotonic() < deadline, f"{model}: never {check}, last {stats}"
        time.sleep(0.02)


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


@pytest.fixture(scope="module")
def fastapi_server() -> Iterator[tuple[Served, list[str]]]:
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    runtime = make_runtime()
    events: list[str] = []
    with running("fastapi", _fastapi_app(runtime, events), runtime) as served:
        yield served, events
    # mds stopped with the app, after the app's own shutdown ran.
    assert events[-1] == "app stops; mds running: True"
    assert not runtime.running


@pytest.fixture(scope="module")
def flask_server() -> Iterator[Served]:
    pytest.importorskip("flask")
    runtime = make_runtime()
    with running("flask", _flask_app(runtime), runtime) as served:
        yield served


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
    """The Linear model's scores computed directly with numpy."""
    return linear_reference


@pytest.fixture(name="onnx_reference")
def _onnx_reference() -> Any:
    """The ONNX model's outputs computed directly with numpy."""
    return onnx_reference
