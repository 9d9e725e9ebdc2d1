"""Every route, through real servers: uvicorn + FastAPI and werkzeug + Flask."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_allclose

from .conftest import tensor_models, wait_for_statistics

pytestmark = pytest.mark.slow

#: The models with the two-input signature: "tensors" (numpy) always, "onnx"
#: (a real ONNX Runtime session) where onnxruntime and onnx are installed.
TENSOR_MODELS = pytest.mark.parametrize("model", tensor_models())
PLATFORMS = {"tensors": "numpy", "onnx": "onnxruntime_onnx"}


# -- health and metadata ------------------------------------------------------


def test_liveness_and_readiness(server: Any) -> None:
    client = server.client
    for path in ("/ml/health/live", "/ml/v2/health/live"):
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.json() == {"live": True}
    # One model failed to start, so the server as a whole is not ready...
    for path in ("/ml/health/ready", "/ml/v2/health/ready"):
        response = client.get(path)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        body = response.json()
        assert body["ready"] is False
        assert body["models"]["broken"]["reason"].startswith("it is failed: init")
        assert body["models"]["linear"]["ready"] is True
        assert body["pipelines"]["scored"]["ready"] is True
    # ...but each model says for itself.
    assert client.get("/ml/models/linear/ready").json()["ready"] is True
    assert client.get("/ml/v2/models/linear/ready").json() == {"name": "linear", "ready": True}
    assert client.get("/ml/v2/models/linear/versions/1/ready").status_code == 200
    assert client.get("/ml/models/scored/ready").status_code == 200
    broken = client.get("/ml/v2/models/broken/ready")
    assert broken.status_code == 503
    assert broken.json() == {"name": "broken", "ready": False}
    assert client.get("/ml/models/nothing/ready").status_code == 404


@TENSOR_MODELS
def test_metadata(server: Any, model: str) -> None:
    client = server.client
    assert client.get("/ml/v2").json() == {
        "name": "mds",
        "version": __import__("mds").__version__,
        "extensions": [
            "binary_tensor_data",
            "classification",
            "model_configuration",
            "parameters",
            "schedule_policy",
            "statistics",
        ],
    }
    onnx = client.get(f"/ml/v2/models/{model}").json()
    # The signature (read from the model by OnnxHandler); one request is one
    # row (the batch axis is left out).
    assert onnx == {
        "name": model,
        "versions": ["1"],
        "platform": PLATFORMS[model],
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [4]},
            {"name": "ids", "datatype": "INT64", "shape": []},
        ],
        "outputs": [
            {"name": "scores", "datatype": "FP32", "shape": [2]},
            {"name": "best", "datatype": "INT64", "shape": []},
        ],
    }
    assert client.get(f"/ml/v2/models/{model}/versions/1").json() == onnx
    assert client.get(f"/ml/models/{model}").json() == onnx
    assert client.get("/ml/models/linear").json()["platform"] == "python"
    assert client.get("/ml/models/scored").json()["platform"] == "ensemble"
    names = [m["name"] for m in client.get("/ml/models").json()]
    assert names == sorted(names) and {"linear", model, "scored", "broken"} <= set(names)
    wrong = client.get(f"/ml/v2/models/{model}/versions/7")
    assert wrong.status_code == 404
    message = f"model '{model}': no version '7' is loaded; loaded versions: '1'"
    assert wrong.json()["error"] == message
    missing = client.get("/ml/v2/models/nothing")
    assert missing.status_code == 404
    assert missing.json()["type"] == "ModelNotFound"
    assert "'nothing'" in missing.json()["error"]


def test_statistics(server: Any) -> None:
    server.client.post("/ml/models/echo/infer", json=1)
    stats = server.client.get("/ml/statistics").json()
    assert stats["echo"]["completed"] >= 1
    assert set(stats) >= {"echo", "linear", *tensor_models()}


# -- mds's own JSON route -----------------------------------------------------


def test_json_inference_beside_the_apps_own_routes(server: Any, linear_reference: Any) -> None:
    client = server.client
    features = [0.5, -1.0, 2.0, 0.25]
    response = client.post("/ml/models/linear/infer", json=features)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-own-middleware"] == "yes"  # the app's middleware still runs
    assert_allclose(response.json()["scores"], linear_reference(features), rtol=1e-5)
    mine = client.post("/mine", json={"features": features})
    assert mine.status_code == 200
    assert_allclose(mine.json()["mine"]["scores"], linear_reference(features), rtol=1e-5)
    # A pipeline is served the same way.
    piped = client.post("/ml/models/scored/infer", json={"features": features})
    assert_allclose(piped.json()["scores"], linear_reference(features), rtol=1e-5)


def _error(response: Any, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["type"] == kind
    assert "Traceback" not in response.text
    return str(body["error"])


def test_the_error_table(server: Any) -> None:
    client = server.client
    message = _error(client.post("/ml/models/linear/infer", content=b"[1, 2"), 400, "DecodeError")
    assert "not valid JSON" in message
    message = _error(client.post("/ml/models/linear/infer", json=[1, 2]), 400, "InvalidInput")
    assert "expected 4 features, got 2" in message
    message = _error(client.post("/ml/models/nothing/infer", json=1), 404, "ModelNotFound")
    assert "no model named 'nothing'" in message
    response = client.post("/ml/models/broken/infer", json=1)
    message = _error(response, 503, "NotReady")
    assert response.headers["retry-after"] == "1"
    assert "no weights at /models/broken" in message
    message = _error(client.post("/ml/models/fails/infer", json=1), 500, "InferenceError")
    assert "RuntimeError" in message
    response = client.post("/ml/models/slow/infer", json=0.5, headers={"Mds-Timeout": "0.1"})
    assert "deadline" in _error(response, 504, "DeadlineExceeded")
    response = client.post("/ml/models/echo/infer", json=1, headers={"Mds-Timeout": "soon"})
    assert "Mds-Timeout" in _error(response, 400, "DecodeError")
    response = client.post("/ml/models/echo/infer", json=1, headers={"Mds-Priority": "-1"})
    assert "Mds-Priority" in _error(response, 400, "DecodeError")
    big = json.dumps([0.0] * 30_000).encode()
    message = _error(client.post("/ml/models/echo/infer", content=big), 400, "DecodeError")
    assert "max_body_bytes" in message
    # The server goes on serving.
    assert client.post("/ml/models/echo/infer", json={"still": "here"}).json() == {"still": "here"}


def test_overloaded_gets_429_with_retry_after(server: Any) -> None:
    import concurrent.futures

    client = server.client
    assert client.post("/ml/models/slow/infer", json=0.0).status_code == 200  # now idle
    # One computing, one queued (max_queue_size=1), the third is refused at once.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(client.post, "/ml/models/slow/infer", json=3.0)
        wait_for_statistics(server, "slow", lambda s: s["in_flight"] == 1 and s["queued"] == 0)
        second = pool.submit(client.post, "/ml/models/slow/infer", json=0.01)
        wait_for_statistics(server, "slow", lambda s: s["queued"] == 1)
        third = client.post("/ml/models/slow/infer", json=0.01)
        message = _error(third, 429, "Overloaded")
        assert third.headers["retry-after"] == "1"
        assert "full" in message or "queue" in message
        assert first.result().status_code == 200
        assert second.result().status_code == 200


def test_a_streaming_model_sends_server_sent_events(server: Any) -> None:
    client = server.client
    for model, words in (
        ("words", ["one", "two", "three"]),
        ("async_words", ["ONE", "TWO", "THREE"]),
    ):
        with client.stream("POST", f"/ml/models/{model}/infer", json="one two three") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["mds-model-version"] == "1"
            lines = [line for line in response.iter_lines() if line]
        assert lines == [f'data: "{w}"' for w in words]
    # Failing midway: what came first arrives, then an error event.
    with client.stream("POST", "/ml/models/words/infer", json="a b boom c") as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[:2] == ['data: "a"', 'data: "b"']
    assert lines[2] == "event: error"
    error = json.loads(lines[3].removeprefix("data: "))
    assert error["type"] == "InferenceError"
    assert "the stream broke at 'boom'" in error["error"]
    # A model that does not stream, asked for events, sends its response as one.
    with client.stream(
        "POST", "/ml/models/echo/infer", json=[1, 2], headers={"Accept": "text/event-stream"}
    ) as response:
        assert [line for line in response.iter_lines() if line] == ["data: [1,2]"]
    # An error before the first chunk is a plain error response.
    response = client.post("/ml/models/words/infer", json="x", headers={"Mds-Timeout": "0"})
    assert response.status_code == 400


# -- the Open Inference Protocol ----------------------------------------------


def _v2_rows(x: np.ndarray, ids: np.ndarray) -> dict[str, Any]:
    return {
        "id": "req-1",
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()},
            {"name": "ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.tolist()},
        ],
    }


@TENSOR_MODELS
def test_v2_inference_on_a_tensor_model(server: Any, onnx_reference: Any, model: str) -> None:
    x = np.array([0.5, -1.0, 2.0, 0.25], dtype=np.float32)
    ids = np.array(3, dtype=np.int64)
    response = server.client.post(f"/ml/v2/models/{model}/infer", json=_v2_rows(x, ids))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == model and body["model_version"] == "1" and body["id"] == "req-1"
    outputs = {o["name"]: o for o in body["outputs"]}
    scores, best = onnx_reference(x[None], ids[None])
    assert outputs["scores"]["datatype"] == "FP32" and outputs["scores"]["shape"] == [2]
    assert_allclose(outputs["scores"]["data"], scores[0], rtol=1e-5)
    assert outputs["best"] == {
        "name": "best",
        "shape": [],
        "datatype": "INT64",
        "data": [int(best[0])],
    }
    # Outputs asked for by name: only those come back.
    request = {**_v2_rows(x, ids), "outputs": [{"name": "best"}]}
    response = server.client.post(f"/ml/v2/models/{model}/versions/1/infer", json=request)
    assert [o["name"] for o in response.json()["outputs"]] == ["best"]


def _binary_body(
    inputs: list[tuple[str, str, list[int], bytes]], **extra: Any
) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": len(raw)},
                }
                for name, datatype, shape, raw in inputs
            ],
            **extra,
        }
    ).encode()
    body = head + b"".join(raw for *_, raw in inputs)
    return body, {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def _split_binary(response: Any) -> tuple[dict[str, Any], dict[str, bytes]]:
    size = int(response.headers["inference-header-content-length"])
    head = json.loads(response.content[:size])
    rest = response.content[size:]
    raw: dict[str, bytes] = {}
    for output in head["outputs"]:
        length = output.get("parameters", {}).get("binary_data_size")
        if length is not None:
            raw[output["name"]], rest = rest[:length], rest[length:]
    assert rest == b""
    return head, raw


@TENSOR_MODELS
def test_v2_binary_tensors_both_ways(server: Any, onnx_reference: Any, model: str) -> None:
    x = np.array([1.0, 2.0, -3.0, 0.5], dtype=np.float32)
    ids = np.array(1, dtype=np.int64)
    body, headers = _binary_body(
        [("x", "FP32", [4], x.tobytes()), ("ids", "INT64", [], ids.tobytes())],
        outputs=[{"name": "scores", "parameters": {"binary_data": True}}, {"name": "best"}],
    )
    response = server.client.post(f"/ml/v2/models/{model}/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    head, raw = _split_binary(response)
    outputs = {o["name"]: o for o in head["outputs"]}
    scores, best = onnx_reference(x[None], ids[None])
    assert_allclose(np.frombuffer(raw["scores"], dtype="<f4"), scores[0], rtol=1e-5)
    assert outputs["best"]["data"] == [int(best[0])]  # asked for as JSON
    # binary_data_output asks for every output as binary.
    body, headers = _binary_body(
        [("x", "FP32", [4], x.tobytes()), ("ids", "INT64", [], ids.tobytes())],
        parameters={"binary_data_output": True},
    )
    response = server.client.post(f"/ml/v2/models/{model}/infer", content=body, headers=headers)
    head, raw = _split_binary(response)
    assert set(raw) == {"scores", "best"}
    assert np.frombuffer(raw["best"], dtype="<i8")[0] == best[0]


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    return (np.asarray(values, dtype="<f4").view("<u4") >> 16).astype("<u2")


CODEC_CASES: list[tuple[str, list[Any], list[int]]] = [
    ("BOOL", [True, False, True, True], [2, 2]),
    ("UINT8", [0, 255, 7], [3]),
    ("UINT16", [0, 65535], [2]),
    ("UINT32", [0, 4_000_000_000], [2]),
    ("UINT64", [0, 2**63 + 5], [2]),
    ("INT8", [-128, 127], [2]),
    ("INT16", [-32768, 32767], [2]),
    ("INT32", [-(2**31), 2**31 - 1], [2]),
    ("INT64", [-(2**63), 2**63 - 1], [2]),
    ("FP16", [0.5, -2.0, 65504.0], [3]),
    ("FP32", [0.5, -1024.0, 3.25], [1, 3]),
    ("FP64", [0.1, -1e300], [2]),
    ("BF16", [1.0, -2.5, 0.15625], [3]),
    ("BYTES", ["héllo", "", "wörld"], [3, 1]),
]


@pytest.mark.parametrize(
    ("datatype", "data", "shape"), CODEC_CASES, ids=[c[0] for c in CODEC_CASES]
)
def test_every_datatype_round_trips_as_json_and_binary(
    server: Any, datatype: str, data: list[Any], shape: list[int]
) -> None:
    client = server.client
    request = {"inputs": [{"name": "t", "shape": shape, "datatype": datatype, "data": data}]}
    response = client.post("/ml/v2/models/echo/infer", json=request)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    # Echo gives back {"t": array}; BF16 arrives widened to float32 (numpy has no bfloat16).
    expected_type = "FP32" if datatype == "BF16" else datatype
    assert output == {"name": "t", "shape": shape, "datatype": expected_type, "data": data}

    from mds._oip.protocol import DATATYPES

    if datatype == "BYTES":
        raw = b"".join(len(v.encode()).to_bytes(4, "little") + v.encode() for v in data)
    elif datatype == "BF16":
        raw = _bf16_bits(np.asarray(data)).tobytes()
    else:
        raw = np.asarray(data, dtype=DATATYPES[datatype]).tobytes()
    body, headers = _binary_body(
        [("t", datatype, shape, raw)], parameters={"binary_data_output": datatype != "BF16"}
    )
    response = client.post("/ml/v2/models/echo/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    if datatype == "BF16":
        (output,) = response.json()["outputs"]
        assert output["data"] == data and output["datatype"] == "FP32"
    else:
        head, back = _split_binary(response)
        assert back["t"] == raw
        assert head["outputs"][0]["shape"] == shape


MALFORMED: list[tuple[str, Any, str]] = [
    ("bad json", b'{"inputs": [', "not valid JSON"),
    ("no inputs", {"outputs": []}, "missing required field `inputs`"),
    (
        "wrong field type",
        {"inputs": [{"name": "x", "shape": "4", "datatype": "FP32", "data": []}]},
        "$.inputs[0].shape",
    ),
    (
        "unknown datatype",
        {"inputs": [{"name": "x", "shape": [1], "datatype": "FP8", "data": [1]}]},
        "unknown datatype 'FP8'",
    ),
    (
        "data vs shape",
        {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}]},
        "shape [2, 2] needs 4 values; data has 3",
    ),
    (
        "data vs datatype",
        {"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": ["a"]}]},
        "input 'x': INT32 data must be whole numbers, got 'a' (str) at 0",
    ),
    (
        "negative dim",
        {"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]},
        "negative dimension",
    ),
    (
        "no data",
        {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]},
        "input 'x': has no data",
    ),
    (
        "twice",
        {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}] * 2},
        "given twice",
    ),
    (
        "bool as int",
        {"inputs": [{"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}]},
        "true or false",
    ),
]


@pytest.mark.parametrize(("case", "body", "says"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_v2_bodies_get_a_400_that_names_the_problem(
    server: Any, case: str, body: Any, says: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = server.client.post("/ml/v2/models/echo/infer", content=content)
    assert says in _error(response, 400, "DecodeError")
    assert server.client.get("/ml/v2/health/live").status_code == 200


@TENSOR_MODELS
def test_v2_requests_checked_against_the_models_inputs(server: Any, model: str) -> None:
    client = server.client
    only_x = {"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    message = _error(client.post(f"/ml/v2/models/{model}/infer", json=only_x), 400, "InvalidInput")
    assert message == f"model '{model}' (version 1): input 'ids' is missing; it needs x, ids"
    extra = {
        "inputs": [*only_x["inputs"], {"name": "y", "shape": [1], "datatype": "FP32", "data": [1]}]
    }
    message = _error(client.post(f"/ml/v2/models/{model}/infer", json=extra), 400, "InvalidInput")
    assert (
        message == f"model '{model}' (version 1): the model has no input 'y'; its inputs are x, ids"
    )
    wrong_shape = {
        "inputs": [
            {"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "ids", "shape": [], "datatype": "INT64", "data": [1]},
        ]
    }
    right_shape = {
        "inputs": [
            {"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]},
            {"name": "ids", "shape": [], "datatype": "INT64", "data": [1]},
        ]
    }
    message = _error(
        client.post(f"/ml/v2/models/{model}/infer", json=wrong_shape), 400, "InvalidInput"
    )
    assert "'x'" in message
    asked = {"inputs": right_shape["inputs"], "outputs": [{"name": "nope"}]}
    message = _error(client.post(f"/ml/v2/models/{model}/infer", json=asked), 400, "InvalidInput")
    assert "no output 'nope'" in message


BINARY_PROBLEMS: list[tuple[str, bytes, dict[str, str], str]] = [
    ("header not a number", b"{}", {"Inference-Header-Content-Length": "x"}, "whole number"),
    ("header too long", b"{}", {"Inference-Header-Content-Length": "99"}, "only 2 bytes"),
]


@pytest.mark.parametrize(
    ("case", "body", "headers", "says"), BINARY_PROBLEMS, ids=[b[0] for b in BINARY_PROBLEMS]
)
def test_bad_binary_framing_gets_a_400(
    server: Any, case: str, body: bytes, headers: dict[str, str], says: str
) -> None:
    response = server.client.post("/ml/v2/models/echo/infer", content=body, headers=headers)
    assert says in _error(response, 400, "DecodeError")


def test_binary_sizes_must_add_up(server: Any) -> None:
    raw = np.arange(4, dtype="<f4").tobytes()
    body, headers = _binary_body([("t", "FP32", [4], raw)])
    short = body[:-4]
    response = server.client.post("/ml/v2/models/echo/infer", content=short, headers=headers)
    assert "binary_data_size is 16 bytes, but only 12" in _error(response, 400, "DecodeError")
    response = server.client.post("/ml/v2/models/echo/infer", content=body + b"xx", headers=headers)
    assert "2 bytes of binary data that no input claims" in _error(response, 400, "DecodeError")
    body, headers = _binary_body([("t", "FP32", [5], raw)])
    response = server.client.post("/ml/v2/models/echo/infer", content=body, headers=headers)
    assert "needs 20 bytes; binary_data_size is 16" in _error(response, 400, "DecodeError")
    body, headers = _binary_body([("t", "BYTES", [1], b"\x09\x00\x00\x00abc")])
    response = server.client.post("/ml/v2/models/echo/infer", content=body, headers=headers)
    assert "says 9 bytes, but only 3 remain" in _error(response, 400, "DecodeError")


def test_v2_pipeline_and_streaming(server: Any, linear_reference: Any) -> None:
    client = server.client
    request = {
        "inputs": [{"name": "features", "shape": [4], "datatype": "FP32", "data": [1, 0, 0, 1]}]
    }
    # The pipeline's function node gets the dict of arrays; Linear wants a list of 4.
    response = client.post("/ml/v2/models/scored/infer", json=request)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["name"] == "scores"
    assert_allclose(output["data"], linear_reference([1, 0, 0, 1]), rtol=1e-5)
    words = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a b"]}]}
    with client.stream(
        "POST", "/ml/v2/models/echo/infer", json=words, headers={"Accept": "text/event-stream"}
    ) as response:
        events = [
            json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")
        ]
    assert events[0]["outputs"][0]["data"] == ["a b"]
