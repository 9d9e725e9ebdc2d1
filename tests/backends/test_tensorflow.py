"""The TensorFlow backend with a real SavedModel, built and saved by the tests."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from numpy.testing import assert_allclose

import mds
from mds._backends.tf_handler import TensorFlowHandler

from .. import two_inputs

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ banner, not its errors
tf = pytest.importorskip(
    "tensorflow", reason="the TensorFlow backend's tests need tensorflow (the tensorflow extra)"
)

BATCHED = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=8, max_queue_delay=0.01))

rng = np.random.default_rng(0)
X = rng.standard_normal((10, 4)).astype(np.float32)
IDS = np.arange(10, dtype=np.int64)


def build(tf: Any) -> Any:
    """A tf.Module with one signature per form a model may take.

    ``serving_default`` is ``two_inputs``' model (two inputs, two outputs);
    ``linear`` its layer alone (one input, one output); ``fixed`` the layer
    on a ``[1, 4]`` input (no batch axis); ``lengths`` takes strings;
    ``any_rank`` an input of unknown rank.
    """
    spec = tf.TensorSpec

    class Model(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(two_inputs.W.T)
            self.b = tf.Variable(two_inputs.B)

        @tf.function(input_signature=[spec([None, 4], tf.float32), spec([None], tf.int64)])
        def serve(self, x: Any, ids: Any) -> Any:
            scores = x @ self.w + self.b + tf.cast(ids, tf.float32)[:, None]
            return {"scores": scores, "best": tf.argmax(scores, axis=1)}

        @tf.function(input_signature=[spec([None, 4], tf.float32)])
        def linear(self, x: Any) -> Any:
            return {"y": x @ self.w + self.b}

        @tf.function(input_signature=[spec([1, 4], tf.float32)])
        def fixed(self, x: Any) -> Any:
            return {"y": x @ self.w + self.b}

        @tf.function(input_signature=[spec([None], tf.string)])
        def lengths(self, text: Any) -> Any:
            return {"length": tf.strings.length(text)}

        @tf.function(input_signature=[spec(None, tf.float32)])
        def any_rank(self, x: Any) -> Any:
            return {"twice": x * 2}

    return Model()


class Saved:
    """The SavedModel's directory, and TensorFlow's own answers for ``X`` and ``IDS``."""

    def __init__(self, path: Path, module: Any) -> None:
        self.path = path
        answer = module.serve(tf.constant(X), tf.constant(IDS))
        self.scores = answer["scores"].numpy()
        self.best = answer["best"].numpy()
        self.linear = module.linear(tf.constant(X))["y"].numpy()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    module = build(tf)
    path = tmp_path_factory.mktemp("tf") / "model"
    signatures = {
        "serving_default": module.serve,
        "linear": module.linear,
        "fixed": module.fixed,
        "lengths": module.lengths,
        "any_rank": module.any_rank,
    }
    tf.saved_model.save(module, str(path), signatures=signatures)
    return Saved(path, module)


def requests_for(x: np.ndarray, ids: np.ndarray) -> list[dict[str, Any]]:
    return [{"x": x[i], "ids": ids[i]} for i in range(len(x))]


async def test_a_batched_model_serves_what_tensorflow_computes(
    saved: Saved, serve_all: Any
) -> None:
    handler = TensorFlowHandler(saved.path, examples=[{"x": X[0], "ids": IDS[0]}])
    async with mds.ModelRuntime(handler, BATCHED) as model:
        results = await serve_all(model, requests_for(X, IDS))
        assert handler.batched
        assert max(model.statistics().batch_sizes) > 1
        one = await model.serve({"x": X[3], "ids": IDS[3]})  # alone, not batched with others
    scores = np.stack([r["scores"] for r in results])
    assert_allclose(scores, saved.scores, rtol=1e-5)
    assert_allclose(scores, two_inputs.reference(X, IDS)[0], rtol=1e-5)
    assert [int(r["best"]) for r in results] == list(saved.best)
    assert_allclose(one["scores"], saved.scores[3], rtol=1e-5)
    assert results[0]["scores"].dtype == np.float32 and results[0]["best"].dtype == np.int64


async def test_the_signature_is_read_from_the_saved_model(saved: Saved) -> None:
    handler = TensorFlowHandler(saved.path)
    async with mds.ModelRuntime(handler):
        inputs, outputs = handler.signature()
        assert handler.inputs["x"] == mds.TensorSpec(name="x", dtype="float32", shape=(None, 4))
    assert TensorFlowHandler.platform == "tensorflow_savedmodel"
    # in the order of their names: a SavedModel's own order changes from load to load
    assert list(inputs) == ["ids", "x"] and list(outputs) == ["best", "scores"]
    assert inputs == {
        "x": mds.TensorSpec(name="x", dtype="float32", shape=(4,)),
        "ids": mds.TensorSpec(name="ids", dtype="int64", shape=()),
    }
    assert outputs == {
        "best": mds.TensorSpec(name="best", dtype="int64", shape=()),
        "scores": mds.TensorSpec(name="scores", dtype="float32", shape=(2,)),
    }


async def test_one_input_and_one_output_go_alone(saved: Saved, serve_all: Any) -> None:
    handler = TensorFlowHandler(saved.path, signature="linear")
    async with mds.ModelRuntime(handler, BATCHED) as model:
        results = await serve_all(model, [*X[:5], *[row.tolist() for row in X[5:]]])
        named = await model.serve({"x": X[0]})  # as the protocol sends it
    assert_allclose(np.stack(results), saved.linear, rtol=1e-5)
    assert_allclose(named, saved.linear[0], rtol=1e-5)


async def test_outputs_picks_what_comes_back(saved: Saved) -> None:
    handler = TensorFlowHandler(saved.path, outputs=["best"])
    async with mds.ModelRuntime(handler) as model:
        best = await model.serve({"x": X[1], "ids": IDS[1]})
    assert int(best) == saved.best[1]


async def test_strings_go_in_and_out(saved: Saved, serve_all: Any) -> None:
    handler = TensorFlowHandler(saved.path, signature="lengths")
    async with mds.ModelRuntime(handler, BATCHED) as model:
        assert handler.inputs["text"].dtype == "object"
        results = await serve_all(model, ["a", "four", b"bytes", np.array("", object)])
    assert [int(r) for r in results] == [1, 4, 5, 0]


async def test_bad_requests_fail_alone_naming_the_input(saved: Saved, serve_all: Any) -> None:
    good = {"x": np.ones(4, np.float32), "ids": np.int64(1)}
    bad: list[tuple[Any, str]] = [
        (
            {"x": np.ones(4, np.float32)},
            # (a signature's inputs come in the order of their names)
            "input 'ids' is missing; the model takes ids (int64 scalar), x (float32 [4])",
        ),
        ({**good, "y": 1}, "the model has no input 'y'; its inputs are ids, x"),
        ({**good, "x": np.ones(4, np.float64)}, "input 'x': expected dtype float32, got float64"),
        (
            {**good, "x": np.ones(5, np.float32)},
            "input 'x': expected shape (4) per request (the batch axis is added by batching), "
            "got (5)",
        ),
        ({**good, "x": np.ones((1, 4), np.float32)}, "input 'x': expected shape (4) per request"),
        ({**good, "ids": 1.5}, "input 'ids': expected whole numbers (int64), got float64 values"),
        ({**good, "x": ["a", "b", "c", "d"]}, "input 'x': expected numbers (float32)"),
        (np.ones(4, np.float32), "the model takes 2 inputs"),
    ]
    async with mds.ModelRuntime(TensorFlowHandler(saved.path), BATCHED) as model:
        results = await serve_all(model, [good, *[request for request, _ in bad], good])
    assert isinstance(results[0], dict) and isinstance(results[-1], dict)
    for result, (_, message) in zip(results[1:-1], bad, strict=True):
        assert isinstance(result, mds.InvalidInput), result
        assert message in str(result)


async def test_a_model_without_a_batch_axis_cannot_batch(saved: Saved) -> None:
    with pytest.raises(mds.LifecycleError, match=r"no dynamic batch axis .*max_batch_size to 1"):
        async with mds.ModelRuntime(TensorFlowHandler(saved.path, signature="fixed"), BATCHED):
            pass
    handler = TensorFlowHandler(saved.path, signature="fixed")
    async with mds.ModelRuntime(handler) as model:
        assert handler.signature()[0]["x"].shape == (1, 4)
        result = await model.serve(X[:1])
        with pytest.raises(mds.InvalidInput, match=r"input 'x': expected shape \(1, 4\), got"):
            await model.serve(X[0])
    assert_allclose(result, saved.linear[:1], rtol=1e-5)


async def test_an_input_of_unknown_rank_needs_its_shape_given(saved: Saved) -> None:
    with pytest.raises(mds.LifecycleError, match=r"rank of input 'x' is not known"):
        async with mds.ModelRuntime(TensorFlowHandler(saved.path, signature="any_rank")):
            pass
    given = mds.TensorSpec(name="x", dtype="float32", shape=(None, 3))
    handler = TensorFlowHandler(saved.path, signature="any_rank", inputs=[given])
    async with mds.ModelRuntime(handler, BATCHED) as model:
        result = await model.serve([1, 2, 3])
        with pytest.raises(mds.InvalidInput, match=r"input 'x': expected shape \(3\)"):
            await model.serve([1, 2])
    assert_allclose(result, [2, 4, 6])


async def test_instances_on_one_device_share_the_loaded_model(saved: Saved) -> None:
    handlers: list[TensorFlowHandler] = []

    def make() -> TensorFlowHandler:
        handlers.append(TensorFlowHandler(saved.path, signature="linear"))
        return handlers[-1]

    async with mds.ModelRuntime(make, mds.ModelConfig(instances=2)) as model:
        assert handlers[0].model is handlers[1].model
        result = await model.serve(X[2])
    assert_allclose(result, saved.linear[2], rtol=1e-5)
    assert all(handler.model is None for handler in handlers)  # released at stop


async def test_what_cannot_be_served_fails_the_start(
    saved: Saved, tmp_path: Path, devices: mds.DeviceManager
) -> None:
    for handler, problem in [
        (TensorFlowHandler(tmp_path), "no SavedModel at"),
        (TensorFlowHandler(saved.path, signature="nope"), "no signature 'nope'; it has "),
        (TensorFlowHandler(saved.path, outputs=["nope"]), r"outputs \['nope'\] are not in"),
        (
            TensorFlowHandler(
                saved.path, inputs=[mds.TensorSpec(name="z", dtype="int64", shape=())]
            ),
            "inputs names 'z', which signature 'serving_default' does not take",
        ),
        (
            TensorFlowHandler(
                saved.path, inputs=[mds.TensorSpec(name="x", dtype="float64", shape=(None, 4))]
            ),
            "input 'x' is float32 in the signature, not float64",
        ),
        (
            TensorFlowHandler(
                saved.path, inputs=[mds.TensorSpec(name="x", dtype="float32", shape=(None, 5))]
            ),
            r"input 'x' has shape \(\?, 4\) in the signature; \(\?, 5\) does not fit it",
        ),
    ]:
        with pytest.raises(mds.LifecycleError, match=problem):
            async with mds.ModelRuntime(handler):
                pass
    if not tf.config.list_physical_devices("GPU"):
        config = mds.ModelConfig(devices="cuda:1")
        with pytest.raises(
            mds.LifecycleError, match=r"TensorFlow sees 0 GPU.* cannot run on cuda:1"
        ):
            async with mds.ModelRuntime(TensorFlowHandler(saved.path), config, devices=devices):
                pass


def test_tensorflow_is_imported_only_when_a_handler_starts() -> None:
    code = (
        "import sys, mds\n"
        "from mds._backends import tf_handler\n"
        "assert 'tensorflow' not in sys.modules\n"
        "sys.modules['tensorflow'] = None  # as if not installed\n"
        "try:\n"
        "    tf_handler._tf()\n"
        "except mds.MissingDependency as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=45
    )
    assert "mds.TensorFlowHandler needs the optional dependency" in out.stdout
    assert 'pip install "mds-serving[tensorflow]"' in out.stdout


def test_the_open_inference_protocol_serves_it(saved: Saved) -> None:
    pytest.importorskip("fastapi", reason="the protocol is served here through FastAPI")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    import mds.fastapi

    runtime = mds.Runtime()
    runtime.add_model("tf", functools.partial(TensorFlowHandler, saved.path), BATCHED)
    app = FastAPI()
    mds.fastapi.add_routes(app, runtime, load="wait")
    rows = {  # three rows, as Triton's clients send them: split through the batcher
        "inputs": [
            {"name": "x", "shape": [3, 4], "datatype": "FP32", "data": X[:3].ravel().tolist()},
            {"name": "ids", "shape": [3], "datatype": "INT64", "data": IDS[:3].tolist()},
        ]
    }
    with TestClient(app) as client:
        metadata = client.get("/v2/models/tf").json()
        response = client.post("/v2/models/tf/infer", json=rows)
        wrong = client.post("/v2/models/tf/infer", json={"inputs": rows["inputs"][:1]})
    assert metadata["platform"] == "tensorflow_savedmodel"
    assert metadata["inputs"] == [
        {"name": "ids", "datatype": "INT64", "shape": []},
        {"name": "x", "datatype": "FP32", "shape": [4]},
    ]
    assert [o["name"] for o in metadata["outputs"]] == ["best", "scores"]
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["scores"]["shape"] == [3, 2]
    assert_allclose(np.reshape(outputs["scores"]["data"], (3, 2)), saved.scores[:3], rtol=1e-5)
    assert outputs["best"]["data"] == saved.best[:3].tolist()
    assert wrong.status_code == 400 and "'ids'" in wrong.json()["error"]


def deploy_savedmodel(saved: Path, model: Path, version: int) -> None:
    """As a deploy does: copy the SavedModel into a hidden folder, then rename it into place."""
    staging = model / f".{version}.incoming"
    shutil.copytree(saved, staging / "model.savedmodel")
    os.rename(staging, model / str(version))


async def test_a_repository_serves_a_savedmodel_with_no_code(
    saved: Saved, tmp_path: Path, serve_all: Any
) -> None:
    root = tmp_path / "models"
    model = root / "dense"

    def build() -> dict[str, list[str]]:
        model.mkdir(parents=True)
        deploy_savedmodel(saved.path, model, 1)
        (model / "mds.yaml").write_text("config: {batching: {max_batch_size: 4}}\n")
        return mds.ModelRepository(root).check()

    assert await anyio.to_thread.run_sync(build) == {"dense": ["1"]}
    runtime = mds.Runtime()
    repository = mds.ModelRepository(root)
    await anyio.to_thread.run_sync(repository.add_to, runtime)
    async with runtime:
        assert runtime.servable("dense").platform == "tensorflow_savedmodel"
        results = await serve_all(runtime.servable("dense"), requests_for(X, IDS))
        assert repository.index() == [{"name": "dense", "version": "1", "state": "READY"}]
        # A second version, deployed by rename while the runtime runs.
        await anyio.to_thread.run_sync(deploy_savedmodel, saved.path, model, 2)
        await repository.refresh()
        assert runtime.versions("dense").versions == ("2",)
        assert runtime.servable("dense", "2").platform == "tensorflow_savedmodel"
        after = await serve_all(runtime.servable("dense"), requests_for(X, IDS))
    for answers in (results, after):
        assert all(isinstance(r, dict) for r in answers), answers
        assert_allclose(np.stack([r["scores"] for r in answers]), saved.scores, rtol=1e-5)
        assert [int(r["best"]) for r in answers] == list(saved.best)


async def test_repository_options_reach_the_handler(saved: Saved, tmp_path: Path) -> None:
    root = tmp_path / "models"
    model = root / "linear"

    def build() -> None:
        model.mkdir(parents=True)
        deploy_savedmodel(saved.path, model, 1)
        (model / "mds.yaml").write_text("options: {signature: linear}\n")

    await anyio.to_thread.run_sync(build)
    runtime = mds.Runtime()
    await anyio.to_thread.run_sync(mds.ModelRepository(root).add_to, runtime)
    async with runtime:
        answer = await runtime.serve("linear", X[4])
    assert_allclose(answer, saved.linear[4], rtol=1e-5)
