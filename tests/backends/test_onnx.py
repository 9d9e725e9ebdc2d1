"""The ONNX Runtime backend with real exported models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_allclose

import mds

from .. import two_inputs

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def onnx_model() -> bytes:
    return two_inputs.onnx_bytes()


def expected(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return two_inputs.reference(x, ids)[0]


BATCHED = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=8, max_queue_delay=0.01))


def requests_for(x: np.ndarray, ids: np.ndarray) -> list[dict[str, Any]]:
    return [{"x": x[i], "ids": ids[i]} for i in range(len(x))]


@pytest.fixture
def onnx_file(onnx_model: bytes, tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(onnx_model)
    return path


@pytest.mark.parametrize("from_file", [False, True])
async def test_a_batched_model_serves_what_it_computes(
    onnx_model: bytes, onnx_file: Path, from_file: bool, serve_all: Any
) -> None:
    source: Any = onnx_file if from_file else onnx_model
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 4)).astype(np.float32)
    ids = np.arange(10, dtype=np.int64)
    handler = mds.OnnxHandler(source, examples=[{"x": x[0], "ids": ids[0]}])
    async with mds.ModelRuntime(handler, BATCHED) as model:
        results = await serve_all(model, requests_for(x, ids))
        assert handler.batched
        assert handler.inputs["x"] == mds.TensorSpec(name="x", dtype="float32", shape=("batch", 4))
        assert handler.inputs["ids"].dtype == "int64"
        assert list(handler.outputs) == ["scores", "best"]
        assert max(model.statistics().batch_sizes) > 1
    assert_allclose(np.stack([r["scores"] for r in results]), expected(x, ids), rtol=1e-5)
    assert [int(r["best"]) for r in results] == list(expected(x, ids).argmax(axis=1))


async def test_bad_requests_fail_alone_naming_the_input(onnx_model: bytes, serve_all: Any) -> None:
    good = {"x": np.ones(4, np.float32), "ids": np.int64(1)}
    bad: list[tuple[Any, str]] = [
        (
            {"x": np.ones(4, np.float32)},
            "input 'ids' is missing; the model takes x (float32 [4]), ids (int64 scalar)",
        ),
        ({**good, "y": 1}, "the model has no input 'y'; its inputs are x, ids"),
        (
            {**good, "x": np.ones(4, np.float64)},
            "input 'x': expected dtype float32, got float64",
        ),
        (
            {**good, "x": np.ones(5, np.float32)},
            "input 'x': expected shape (4) per request (the batch axis is added by batching), "
            "got (5)",
        ),
        (
            {**good, "x": np.ones((1, 4), np.float32)},
            "input 'x': expected shape (4) per request",
        ),
        ({**good, "ids": 1.5}, "input 'ids': expected whole numbers (int64), got float64 values"),
        (np.ones(4, np.float32), "the model takes 2 inputs"),
    ]
    async with mds.ModelRuntime(mds.OnnxHandler(onnx_model), BATCHED) as model:
        results = await serve_all(model, [good, *[request for request, _ in bad], good])
    assert isinstance(results[0], dict) and isinstance(results[-1], dict)
    for result, (_, message) in zip(results[1:-1], bad, strict=True):
        assert isinstance(result, mds.InvalidInput)
        assert message in str(result)


async def test_lists_become_arrays_of_the_inputs_dtype(onnx_model: bytes) -> None:
    async with mds.ModelRuntime(mds.OnnxHandler(onnx_model)) as model:
        result = await model.serve({"x": [1, 2, 3, 4], "ids": 2})
    x = np.array([[1, 2, 3, 4]], np.float32)
    assert_allclose(result["scores"], expected(x, np.array([2]))[0], rtol=1e-5)


async def test_a_model_without_a_batch_axis_cannot_batch() -> None:
    fixed = two_inputs.onnx_bytes(batch_axis=False)
    with pytest.raises(mds.LifecycleError, match=r"no dynamic batch axis .*max_batch_size to 1"):
        async with mds.ModelRuntime(mds.OnnxHandler(fixed), BATCHED):
            pass
    async with mds.ModelRuntime(mds.OnnxHandler(fixed)) as model:
        result = await model.serve({"x": np.ones((1, 4), np.float32), "ids": np.zeros(1, np.int64)})
    assert result["scores"].shape == (1, 2)


async def test_instances_on_one_device_share_a_session(onnx_model: bytes) -> None:
    handlers: list[mds.OnnxHandler] = []

    def make() -> mds.OnnxHandler:
        handlers.append(mds.OnnxHandler(onnx_model, outputs=["scores"]))
        return handlers[-1]

    config = mds.ModelConfig(instances=3, cpu_threads=1)
    async with mds.ModelRuntime(make, config) as model:
        assert handlers[0].session is handlers[1].session is handlers[2].session
        options = handlers[0].session.get_session_options()
        assert options.intra_op_num_threads == 1
        result = await model.serve({"x": np.ones(4, np.float32), "ids": np.int64(0)})
    assert result.shape == (2,)  # one output asked for: the array alone


async def test_unknown_outputs_and_providers_fail_the_start(
    onnx_model: bytes, devices: mds.DeviceManager
) -> None:
    with pytest.raises(mds.LifecycleError, match=r"outputs \['nope'\] are not in the model"):
        async with mds.ModelRuntime(mds.OnnxHandler(onnx_model, outputs=["nope"])):
            pass
    config = mds.ModelConfig(devices="cuda:1")
    with pytest.raises(mds.LifecycleError, match="onnxruntime has no CUDA provider for cuda:1"):
        async with mds.ModelRuntime(mds.OnnxHandler(onnx_model), config, devices=devices):
            pass
    with pytest.raises(mds.ConfigError, match="graph_optimization 'max'"):
        mds.OnnxHandler(onnx_model, graph_optimization="max")  # type: ignore[arg-type]


async def test_values_that_do_not_fit_an_inputs_dtype_are_refused_never_wrapped(
    onnx_model: bytes,
) -> None:
    async with mds.ModelRuntime(mds.OnnxHandler(onnx_model)) as model:
        for request, problem in [
            ({"x": [1e39, 0, 0, 0], "ids": 1}, "input 'x': a value is out of float32's range"),
            ({"x": [1, 2, 3, 4], "ids": 2**70}, "input 'ids': expected whole numbers (int64)"),
            ({"x": [1, 2, 3, 4], "ids": 1.5}, "input 'ids': expected whole numbers (int64)"),
            ({"x": [True, False, True, False], "ids": 1}, "expected numbers (float32)"),
            ({"x": ["a", "b", "c", "d"], "ids": 1}, "expected numbers (float32), got <U1"),
        ]:
            with pytest.raises(
                mds.InvalidInput, match=problem.replace("(", r"\(").replace(")", r"\)")
            ):
                await model.serve(request)
