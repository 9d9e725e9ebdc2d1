"""The rest of the protocol over real servers, with Triton's official HTTP client.

Request parameters reaching the handler, ``timeout`` and ``priority`` as
parameters, classification, the statistics and model configuration
extensions, and mds's routes in a FastAPI app's OpenAPI schema.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mds

from ..servers import Served, running

pytestmark = pytest.mark.slow

LABELS = ("cat", "dog", "bird")


class Scores(mds.ModelHandler[Any, dict[str, Any]]):
    """``x`` (4 numbers) → ``scores`` (3, labelled); records what its steps were told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, mds.RequestContext]] = []
        self.lock = threading.Lock()

    def signature(self) -> Any:
        spec = mds.TensorSpec
        return (
            {"x": spec(name="x", dtype="float32", shape=(4,))},
            {
                "scores": spec(name="scores", dtype="float32", shape=(3,), labels=LABELS),
                "total": spec(name="total", dtype="float32", shape=()),
            },
        )

    def preprocess(self, request: Any) -> np.ndarray:  # in a worker thread
        with self.lock:
            self.seen.append(("preprocess", mds.request_context()))
        return np.asarray(request["x"], dtype=np.float32)

    def infer(self, batch: Sequence[np.ndarray]) -> list[Any]:
        return [x[:3] * float(mds.request_context().parameters.get("scale", 1)) for x in batch]

    async def postprocess(self, scores: np.ndarray) -> dict[str, Any]:
        context = mds.request_context()
        with self.lock:
            self.seen.append(("postprocess", context))
        scale = float(context.parameters.get("scale", 1))
        return {"scores": scores * scale, "total": np.float32(scores.sum() * scale)}

    def contexts(self, request_id: str) -> list[tuple[str, mds.RequestContext]]:
        with self.lock:
            return [(step, c) for step, c in self.seen if c.id == request_id]


class Sleeps(mds.ModelHandler[Any, Any]):
    """Sleeps ``x`` seconds; two priority levels."""

    def signature(self) -> Any:
        spec = mds.TensorSpec
        return ({"x": spec(name="x", dtype="float32", shape=())}, {})

    async def infer(self, batch: Sequence[Any]) -> list[Any]:
        import anyio

        await anyio.sleep(float(max(float(item["x"]) for item in batch)))
        return [item["x"] for item in batch]


def make_runtime() -> tuple[mds.Runtime, Scores]:
    scores = Scores()
    runtime = mds.Runtime()
    batched = mds.BatchingConfig(max_batch_size=8, max_queue_delay=0.002)
    runtime.add_model("scores", lambda: scores, mds.ModelConfig(batching=batched))
    runtime.add_model(
        "sleeps",
        Sleeps,
        mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=1, priority_levels=2)),
    )
    runtime.add_pipeline(mds.Pipeline("twice", [mds.Node.model("first", model="scores")]))
    return runtime, scores


def fastapi_app(runtime: mds.Runtime) -> Any:
    from fastapi import FastAPI

    import mds.fastapi

    app = FastAPI()

    @app.get("/{anything:path}")
    async def catch_all(anything: str) -> dict[str, str]:
        return {"caught": anything}

    # After the catch-all: mds's routes must still answer.
    mds.fastapi.add_routes(app, runtime, load="wait")
    return app


def flask_app(runtime: mds.Runtime) -> Any:
    from flask import Flask

    import mds.flask

    app = Flask(__name__)

    @app.get("/<path:anything>")
    def catch_all(anything: str) -> dict[str, str]:
        return {"caught": anything}

    mds.flask.add_routes(app, runtime, load="wait")
    return app


@pytest.fixture(scope="module", params=["fastapi", "flask"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[Served, Scores]]:
    pytest.importorskip(request.param)
    runtime, scores = make_runtime()
    app = fastapi_app(runtime) if request.param == "fastapi" else flask_app(runtime)
    with running(request.param, app, runtime) as server:
        yield server, scores


@pytest.fixture(scope="module")
def triton(served: tuple[Served, Scores]) -> Iterator[Any]:
    client = pytest.importorskip("tritonclient.http")
    found = client.InferenceServerClient(served[0].url.removeprefix("http://"))
    yield found
    found.close()


def rows(count: int) -> np.ndarray:
    return np.arange(count * 4, dtype=np.float32).reshape(count, 4)


def infer_input(array: np.ndarray, name: str = "x", binary: bool = True) -> Any:
    import tritonclient.http as client

    datatype = "FP32"
    found = client.InferInput(name, list(array.shape), datatype)
    found.set_data_from_numpy(array, binary_data=binary)
    return found


def test_parameters_reach_preprocess_and_postprocess(
    served: tuple[Served, Scores], triton: Any
) -> None:
    _, model = served
    result = triton.infer(
        "scores",
        [infer_input(rows(2))],
        request_id="req-7",
        parameters={"scale": 2, "tenant": "acme"},
    )
    np.testing.assert_allclose(result.as_numpy("scores"), rows(2)[:, :3] * 2)
    seen = model.contexts("req-7")
    # Two rows: each row's preprocess and postprocess saw the request's context.
    assert sorted(step for step, _ in seen) == ["postprocess"] * 2 + ["preprocess"] * 2
    for _, context in seen:
        assert context.parameters == {"scale": 2, "tenant": "acme"}
        assert context.outputs == {}


def test_infer_does_not_see_a_requests_context(served: tuple[Served, Scores], triton: Any) -> None:
    # infer computes a whole batch: the scale reaches it only through the item.
    result = triton.infer("scores", [infer_input(rows(1))], parameters={"scale": 3})
    np.testing.assert_allclose(result.as_numpy("scores"), rows(1)[:, :3] * 3)


def test_the_request_id_header_stands_in_for_a_missing_id(served: tuple[Served, Scores]) -> None:
    server, model = served
    body = {"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    reply = server.client.post(
        "/v2/models/scores/infer", json=body, headers={"X-Request-Id": "h-1"}
    )
    assert reply.status_code == 200, reply.text
    assert {c.id for _, c in model.contexts("h-1")} == {"h-1"}


def test_outside_a_request_the_context_is_empty() -> None:
    assert mds.request_context() == mds.RequestContext()
    # Shared by every request that has none: a write would reach them all.
    with pytest.raises(TypeError, match="use_request_context"):
        mds.request_context().parameters["k"] = 1  # type: ignore[index]
    assert mds.request_context().parameters == {}
    mine = copy.copy(mds.request_context().parameters)  # a copy is the caller's own
    mine["k"] = 1  # type: ignore[index]
    assert mds.request_context().parameters == {}
    given = mds.RequestContext(id="mine", parameters={"k": 1})
    with mds.use_request_context(given):
        assert mds.request_context() is given
    assert mds.request_context().id is None


def test_reserved_parameters_do_not_reach_the_handler(served: tuple[Served, Scores]) -> None:
    server, model = served
    body = {
        "id": "reserved",
        "parameters": {"timeout": 10_000_000, "priority": 1, "binary_data_output": False, "k": 1},
        "inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
    }
    assert server.client.post("/v2/models/scores/infer", json=body).status_code == 200
    assert {str(c.parameters) for _, c in model.contexts("reserved")} == {"{'k': 1}"}


def test_classification_names_the_top_classes(served: tuple[Served, Scores], triton: Any) -> None:
    import tritonclient.http as client

    x = np.array([[1, 5, 3, 0], [9, 2, 4, 0]], dtype=np.float32)
    for binary in (False, True):
        asked = client.InferRequestedOutput("scores", binary_data=binary, class_count=2)
        result = triton.infer("scores", [infer_input(x)], outputs=[asked])
        top = result.as_numpy("scores")
        assert top.shape == (2, 2)
        # JSON data comes back as str, binary data as bytes.
        text = [[v.decode() if isinstance(v, bytes) else v for v in row] for row in top]
        assert text == [
            ["5.000000:1:dog", "3.000000:2:bird"],
            ["9.000000:0:cat", "4.000000:2:bird"],
        ]
        # Only what was asked for comes back.
        assert [o["name"] for o in result.get_response()["outputs"]] == ["scores"]


def test_classification_without_a_batch_axis(served: tuple[Served, Scores]) -> None:
    server, _ = served
    body = {
        "inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 5, 3, 0]}],
        "outputs": [{"name": "scores", "parameters": {"classification": 5}}],
    }
    reply = server.client.post("/v2/models/scores/infer", json=body).json()
    (output,) = reply["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [3]  # at most every class
    assert output["data"] == ["5.000000:1:dog", "3.000000:2:bird", "1.000000:0:cat"]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, width=32), min_size=3, max_size=3), st.integers(1, 3))
def test_classification_agrees_with_sorting(scores: list[float], count: int) -> None:
    from mds._oip.call import V2Call, _classes
    from mds._oip.protocol import InferRequest

    class Target:
        def signature(self) -> Any:
            return ({}, {})

    call = V2Call(Target(), InferRequest(inputs=[]), None, None, mds.RequestContext())  # type: ignore[arg-type]
    top = _classes(call, "scores", np.asarray(scores, dtype=np.float32), count)
    order = sorted(range(3), key=lambda i: (-scores[i], i))[:count]
    assert [int(v.decode().split(":")[1]) for v in top] == order


def test_classification_of_text_is_a_400(served: tuple[Served, Scores]) -> None:
    server, _ = served
    runtime_free = {
        "inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
        "outputs": [{"name": "scores", "parameters": {"classification": "two"}}],
    }
    reply = server.client.post("/v2/models/scores/infer", json=runtime_free)
    assert reply.status_code == 400
    assert "parameters.classification: 'two' is not a number of classes" in reply.json()["error"]


@pytest.mark.parametrize(
    ("parameters", "says"),
    [
        ({"timeout": "soon"}, "parameters.timeout: 'soon' is not a number of microseconds"),
        ({"timeout": -5}, "parameters.timeout: -5"),
        ({"priority": -1}, "parameters.priority: -1 is not a priority"),
        ({"priority": True}, "parameters.priority: True"),
        ({"binary_data_output": "yes"}, "parameters.binary_data_output: 'yes'"),
    ],
)
def test_bad_parameters_are_400s_that_say_which(
    served: tuple[Served, Scores], parameters: dict[str, Any], says: str
) -> None:
    server, _ = served
    body = {
        "parameters": parameters,
        "inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
    }
    reply = server.client.post("/v2/models/scores/infer", json=body)
    assert reply.status_code == 400, reply.text
    assert says in reply.json()["error"]


def test_the_timeout_parameter_is_the_requests_deadline(
    served: tuple[Served, Scores], triton: Any
) -> None:
    from tritonclient.utils import InferenceServerException

    x = np.array([5.0], dtype=np.float32)  # sleeps 5 s; the deadline is 50 ms
    with pytest.raises(InferenceServerException) as failed:
        triton.infer("sleeps", [infer_input(x)], timeout=50_000)
    assert "deadline" in str(failed.value).lower()
    assert failed.value.status() == "504"
    quick = triton.infer("sleeps", [infer_input(np.array([0.0], dtype=np.float32))], timeout=0)
    assert quick.as_numpy("output0").tolist() == [0.0]


def test_the_priority_parameter_counts_from_one(served: tuple[Served, Scores], triton: Any) -> None:
    from tritonclient.utils import InferenceServerException

    x = np.array([0.0], dtype=np.float32)
    for priority in (0, 1, 2):  # 0: the default; 1 and 2: mds's levels 0 and 1
        result = triton.infer("sleeps", [infer_input(x)], priority=priority)
        assert result.as_numpy("output0").tolist() == [0.0]
    with pytest.raises(InferenceServerException) as failed:
        triton.infer("sleeps", [infer_input(x)], priority=3)
    assert failed.value.status() == "400"
    assert "parameters.priority: 3 is not a priority of this model: it has 2" in str(failed.value)


def test_statistics_extension_counts_what_was_served(
    served: tuple[Served, Scores], triton: Any
) -> None:
    before = triton.get_inference_statistics("scores")["model_stats"][0]
    triton.infer("scores", [infer_input(rows(3))])
    (after,) = triton.get_inference_statistics("scores", "1")["model_stats"]
    assert after["name"] == "scores" and after["version"] == "1"
    success = after["inference_stats"]["success"]
    assert int(success["count"]) == int(before["inference_stats"]["success"]["count"]) + 3
    assert int(success["ns"]) > 0
    assert int(after["inference_count"]) >= 3
    assert sum(int(b["compute_infer"]["count"]) for b in after["batch_stats"]) == int(
        after["execution_count"]
    )
    everything = triton.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in everything} == {"scores", "sleeps", "twice"}


def test_statistics_of_an_unknown_model_or_version_is_a_404(
    served: tuple[Served, Scores],
) -> None:
    server, _ = served
    reply = server.client.get("/v2/models/nothing/stats")
    assert reply.status_code == 404 and "no model named 'nothing'" in reply.json()["error"]
    assert server.client.get("/v2/models/scores/versions/9/stats").status_code == 404


def test_model_config_extension(served: tuple[Served, Scores], triton: Any) -> None:
    config = triton.get_model_config("scores")
    assert config["name"] == "scores"
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}]
    assert [o["name"] for o in config["output"]] == ["scores", "total"]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    pipeline = triton.get_model_config("twice")
    assert pipeline["platform"] == "ensemble" and pipeline["max_batch_size"] == 0
    metadata = triton.get_server_metadata()
    assert {"statistics", "model_configuration", "classification"} <= set(metadata["extensions"])


def test_a_catch_all_route_does_not_shadow_mds(served: tuple[Served, Scores]) -> None:
    server, _ = served
    assert server.client.get("/health/live").json() == {"live": True}
    assert server.client.get("/v2/models/stats").status_code == 200
    assert server.client.get("/elsewhere").json() == {"caught": "elsewhere"}


def test_routes_are_in_the_openapi_schema() -> None:
    pytest.importorskip("fastapi")
    from starlette.testclient import TestClient

    runtime, _ = make_runtime()
    app = fastapi_app(runtime)
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
        infer = schema["paths"]["/v2/models/{name}/infer"]["post"]
        body = infer["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/MdsInferRequest"}
        reply = infer["responses"]["200"]["content"]["application/json"]["schema"]
        assert reply == {"$ref": "#/components/schemas/MdsInferResponse"}
        assert infer["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/MdsErrorBody"
        }
        assert [p["name"] for p in infer["parameters"]] == ["name"]
        for path in ("/health/ready", "/models/{name}/infer", "/v2/models/stats", "/statistics"):
            assert path in schema["paths"], path
        assert "/{anything}" in schema["paths"]  # the app's own routes are still there
        # Every reference resolves, and operation ids are unique.
        text = httpx.Response(200, json=schema).text
        components = schema["components"]["schemas"]
        for name in {r.split("/")[-1] for r in _refs(schema)}:
            assert name in components, name
        ids = [op["operationId"] for item in schema["paths"].values() for op in item.values()]
        assert len(ids) == len(set(ids)), text[:200]
        # The routes still serve as before: the schema describes, it does not validate.
        answer = client.post("/models/scores/infer", json={"x": [1, 2, 3, 4]})
        assert answer.status_code == 200, answer.text


def _refs(tree: Any) -> Iterator[str]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _refs(value)


def test_a_timeout_past_any_float_is_no_deadline(served: tuple[Served, Scores]) -> None:
    server, _ = served
    body = {
        "parameters": {"timeout": 10**400},
        "inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
    }
    reply = server.client.post("/v2/models/scores/infer", json=body)
    assert reply.status_code == 200, reply.text


class Said(mds.ModelHandler[str, str]):
    """Streams the words of its request, each with the request id its step saw."""

    def infer(self, batch: Sequence[str]) -> list[str]:
        return list(batch)

    def postprocess(self, output: str) -> Iterator[str]:
        for word in output.split():
            yield f"{word}@{mds.request_context().id}"


@pytest.mark.parametrize("kind", ["fastapi", "flask"])
def test_each_streamed_chunk_sees_its_own_requests_context(kind: str) -> None:
    pytest.importorskip(kind)
    runtime = mds.Runtime()
    runtime.add_model("said", Said)
    app = fastapi_app(runtime) if kind == "fastapi" else flask_app(runtime)
    with running(kind, app, runtime) as server:

        def stream(n: int) -> list[str]:
            reply = server.client.post(
                "/models/said/infer", json="a b c d", headers={"X-Request-Id": f"r{n}"}
            )
            return [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(stream, range(24)))
    for n, events in enumerate(answers):
        assert events == [f'"{w}@r{n}"' for w in "abcd"], events


def test_two_prefixes_make_one_valid_schema() -> None:
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    import mds.fastapi

    app = FastAPI()

    @app.get("/models/featured")
    async def featured() -> dict[str, str]:
        return {"featured": "yes"}

    first, _ = make_runtime()
    second, _ = make_runtime()
    mds.fastapi.add_routes(app, first, prefix="/a", load="wait")
    mds.fastapi.add_routes(app, second, prefix="/b", load="wait")
    mds.fastapi.add_routes(app, make_runtime()[0], load="wait")
    with TestClient(app) as client:
        # The app's own route, added first, still answers where mds's pattern fits too.
        assert client.get("/models/featured").json() == {"featured": "yes"}
        assert client.get("/a/health/live").json() == {"live": True}
        schema = client.get("/openapi.json").json()
    ids = [op["operationId"] for item in schema["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    assert {"/a/v2/models/{name}/infer", "/b/v2/models/{name}/infer"} <= set(schema["paths"])
    ready = schema["paths"]["/a/health/ready"]["get"]["responses"]["503"]
    assert ready["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MdsRuntimeHealth"
    }


@pytest.mark.parametrize(
    ("policy", "reported"),
    [
        (mds.VersionPolicy(all=True), {"all": {}}),
        (mds.VersionPolicy(latest=2), {"latest": {"num_versions": 2}}),
        (mds.VersionPolicy(specific=("1", "3")), {"specific": {"versions": [1, 3]}}),
    ],
)
def test_model_config_reports_the_version_policy(
    policy: mds.VersionPolicy, reported: dict[str, Any]
) -> None:
    from mds._oip.reports import model_config

    runtime = mds.Runtime()
    runtime.add_model("sleeps", Sleeps, policy=policy)
    with runtime:
        assert model_config(runtime, "sleeps")["version_policy"] == reported
