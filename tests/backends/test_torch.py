"""The PyTorch backend with real modules, from each kind of source."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from numpy.testing import assert_allclose

import mds

torch = pytest.importorskip("torch")


def make_mlp() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
    ).eval()


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def inputs() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((12, 8)).astype(np.float32)


def direct(module: Any, inputs: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        result: np.ndarray = module(torch.from_numpy(inputs)).numpy()
    return result


async def serve_all(model: mds.ModelRuntime[Any, Any], requests: Any) -> list[Any]:
    results: list[Any] = [None] * len(requests)

    async def call(index: int) -> None:
        results[index] = await model.serve(requests[index])

    async with anyio.create_task_group() as tasks:
        for index in range(len(requests)):
            tasks.start_soon(call, index)
    return results


BATCHED = mds.ModelConfig(
    batching=mds.BatchingConfig(max_batch_size=8, max_queue_delay=0.005),
    warmup_batch_sizes=(1, 8),
)


@pytest.fixture
def saved(tmp_path: Path) -> dict[str, Path]:
    """The MLP saved as a state dict, as TorchScript and as an exported program."""
    module = make_mlp()
    paths = {
        "weights": tmp_path / "mlp.pt",
        "torchscript": tmp_path / "mlp.ts",
        "exported": tmp_path / "mlp.pt2",
    }
    torch.save(module.state_dict(), paths["weights"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated
        torch.jit.save(torch.jit.script(module), paths["torchscript"])
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(module, (torch.zeros(2, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(program, paths["exported"])
    return paths


def _untrained() -> Any:
    torch.manual_seed(123)  # different weights: only the state dict makes them right
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
@pytest.mark.parametrize("source", ["factory", "module", "weights", "torchscript", "exported"])
async def test_every_source_serves_what_the_module_computes(
    source: str, saved: dict[str, Path], inputs: np.ndarray
) -> None:
    kwargs: dict[str, Any] = {
        "factory": {"module": make_mlp},
        "module": {"module": make_mlp()},
        "weights": {"module": _untrained, "weights": saved["weights"]},
        "torchscript": {"torchscript": saved["torchscript"]},
        "exported": {"exported": saved["exported"]},
    }[source]
    handler = mds.TorchHandler(**kwargs, examples=[inputs[0]])
    async with mds.ModelRuntime(handler, BATCHED) as model:
        results = await serve_all(model, list(inputs))
        stats = model.statistics()
    assert_allclose(np.stack(results), direct(make_mlp(), inputs), rtol=1e-5, atol=1e-6)
    assert all(isinstance(r, np.ndarray) and r.shape == (3,) for r in results)
    assert stats.completed == 12 and stats.failed == 0


async def test_instances_get_a_thread_budget_and_run_under_inference_mode(
    inputs: np.ndarray,
) -> None:
    seen: list[tuple[int, bool]] = []

    class Watched(mds.TorchHandler):
        def forward(self, batch: Any) -> Any:
            seen.append((torch.get_num_threads(), torch.is_inference_mode_enabled()))
            return super().forward(batch)

    config = mds.ModelConfig(instances=2, cpu_threads=1)
    async with mds.ModelRuntime(functools.partial(Watched, make_mlp), config) as model:
        await serve_all(model, list(inputs[:4]))
    assert seen and all(entry == (1, True) for entry in seen)


async def test_bfloat16_runs_the_model_in_that_dtype(inputs: np.ndarray) -> None:
    handler = mds.TorchHandler(make_mlp, dtype="bfloat16")
    async with mds.ModelRuntime(handler) as model:
        result = await model.serve(inputs[0])
        assert next(handler.module.parameters()).dtype == torch.bfloat16
    assert result.dtype == np.float32  # numpy has no bfloat16: widened on the way out
    assert_allclose(result, direct(make_mlp(), inputs[:1])[0], rtol=0.05, atol=0.05)


async def test_compile_is_applied_and_warmed_up(inputs: np.ndarray) -> None:
    handler = mds.TorchHandler(make_mlp, compile={"backend": "eager"}, examples=[inputs[0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's own deprecations
        async with mds.ModelRuntime(handler, BATCHED) as model:
            assert type(handler.module).__name__ == "OptimizedModule"
            results = await serve_all(model, list(inputs[:4]))
    assert_allclose(np.stack(results), direct(make_mlp(), inputs[:4]), rtol=1e-5)


class Summer(torch.nn.Module):  # type: ignore[misc]
    """Sums each sequence's real (unmasked) values: padding must not count."""

    def forward(self, values: Any, mask: Any) -> Any:
        return (values * mask).sum(dim=1)


async def test_padded_sequences_reach_the_module_with_their_mask() -> None:
    class Sequences(mds.TorchHandler):
        collator = mds.Pad(0.0)

    requests = [np.arange(n, dtype=np.float32) + 1 for n in (1, 5, 3, 7)]
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=4, max_queue_delay=0.01))
    async with mds.ModelRuntime(Sequences(Summer), config) as model:
        results = await serve_all(model, requests)
    assert [float(r) for r in results] == [float(r.sum()) for r in requests]


def test_a_handler_needs_exactly_one_source(saved: dict[str, Path]) -> None:
    with pytest.raises(mds.ConfigError, match="exactly one source"):
        mds.TorchHandler()
    with pytest.raises(mds.ConfigError, match="got module, torchscript"):
        mds.TorchHandler(make_mlp, torchscript=saved["torchscript"])
    with pytest.raises(mds.ConfigError, match="give module too"):
        mds.TorchHandler(torchscript=saved["torchscript"], weights=saved["weights"])
    with pytest.raises(mds.ConfigError, match="dtype 'int8' is not one of"):
        mds.TorchHandler(make_mlp, dtype="int8")  # type: ignore[arg-type]


async def test_a_factory_that_makes_no_module_fails_the_start() -> None:
    model = mds.ModelRuntime(mds.TorchHandler(lambda: "not a module"))  # type: ignore[arg-type,return-value]
    with pytest.raises(mds.LifecycleError, match=r"returned str, not a torch\.nn\.Module"):
        async with model:
            pass


async def answers(model: mds.ModelRuntime[Any, Any], requests: list[Any]) -> list[Any]:
    results: list[Any] = []
    for request in requests:
        try:
            results.append(await model.serve(request))
        except mds.MdsError as exc:
            results.append(exc)
    return results


async def test_a_bad_request_fails_alone(inputs: np.ndarray) -> None:
    requests: list[Any] = [*inputs[:3], np.zeros(5, np.float32)]
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=4, max_queue_delay=0.01))
    async with mds.ModelRuntime(mds.TorchHandler(make_mlp), config) as model:
        results = await answers(model, requests)
    assert_allclose(np.stack(results[:3]), direct(make_mlp(), inputs[:3]), rtol=1e-5)
    assert isinstance(results[3], mds.InferenceError)
    assert "mat1 and mat2 shapes cannot be multiplied" in str(results[3])


@pytest.mark.parametrize("declared", ["examples", "inputs"])
async def test_requests_are_checked_against_the_models_inputs(
    inputs: np.ndarray, declared: str
) -> None:
    # Known from the warm-up examples, or declared: checked before the batch,
    # each mistake a 400 (InvalidInput) that names the input, alone.
    if declared == "examples":
        handler = mds.TorchHandler(make_mlp, examples=[np.zeros(8, np.float32)])
        name = "input"
    else:
        spec = mds.TensorSpec(name="x", dtype="float32", shape=(8,))
        handler = mds.TorchHandler(make_mlp, inputs=[spec])
        name = "x"
    async with mds.ModelRuntime(handler, BATCHED) as model:
        assert model.signature() == (
            {name: mds.TensorSpec(name=name, dtype="float32", shape=(8,))},
            {},
        )
        results = await answers(
            model,
            [
                inputs[0],
                inputs[1].tolist(),  # JSON: a list becomes a float32 array
                [1, 2, 3, 4, 5, 6, 7, 8],  # ints cast to floats
                {name: inputs[2]},  # the protocol's form: a dict by input name
                np.zeros(5, np.float32),  # wrong width
                inputs[3].astype(np.float64),  # float64 row for a float32 model
                np.array(["a"] * 8),  # strings
                inputs[:2],  # a batch sent as one request: wrong rank
                {"other": inputs[0]},
            ],
        )
    expected = direct(make_mlp(), inputs[:3])
    assert_allclose(np.stack([results[0], results[1], results[3]]), expected, rtol=1e-5)
    assert_allclose(results[2], direct(make_mlp(), np.arange(1, 9, dtype=np.float32)[None])[0])
    problems = [str(r) for r in results[4:]]
    assert all(isinstance(r, mds.InvalidInput) for r in results[4:]), problems
    assert f"input '{name}': expected shape (8) per request" in problems[0]
    assert f"input '{name}': expected dtype float32, got float64" in problems[1]
    assert f"input '{name}': expected dtype float32, got <U1" in problems[2]
    assert "expected shape (8) per request" in problems[3] and "got (2, 8)" in problems[3]
    assert f"input '{name}' is missing" in problems[4]


class Scaled(mds.TorchHandler):
    """Extends the check the way the docs say: a plain ``preprocess`` (run in a thread)."""

    def preprocess(self, request: Any) -> Any:
        return self.check(np.asarray(request["pixels"], np.float32) / 255)


class Logged(mds.TorchHandler):
    """Or an async one that awaits the handler's own."""

    seen = 0

    async def preprocess(self, request: Any) -> Any:
        Logged.seen += 1
        return await super().preprocess(request)


@pytest.mark.parametrize("kind", [Scaled, Logged])
async def test_a_subclass_extends_the_check(inputs: np.ndarray, kind: type) -> None:
    # With a preprocess of its own, a subclass declares the model's inputs
    # (its examples are requests of its own form).
    spec = mds.TensorSpec(name="input", dtype="float32", shape=(8,))
    example = {"pixels": [0.0] * 8} if kind is Scaled else np.zeros(8, np.float32)
    handler = kind(make_mlp, inputs=[spec], examples=[example])
    good: Any = {"pixels": inputs[0] * 255} if kind is Scaled else inputs[0]
    bad: Any = {"pixels": [1.0] * 5} if kind is Scaled else np.zeros(5, np.float32)
    async with mds.ModelRuntime(handler, BATCHED) as model:
        results = await answers(model, [good, bad])
    assert_allclose(results[0], direct(make_mlp(), inputs[:1])[0], rtol=1e-4)
    assert isinstance(results[1], mds.InvalidInput)
    assert "input 'input': expected shape (8) per request" in str(results[1])
    if kind is Logged:
        assert Logged.seen >= 2  # its own step ran, not only the check behind it


def test_a_torch_model_serves_protocol_rows_through_its_batcher(inputs: np.ndarray) -> None:
    pytest.importorskip("fastapi")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    import mds.fastapi

    runtime = mds.Runtime()
    handler = functools.partial(mds.TorchHandler, make_mlp, examples=[np.zeros(8, np.float32)])
    runtime.add_model("mlp", handler, BATCHED)
    app = FastAPI()
    mds.fastapi.add_routes(app, runtime, load="wait")
    rows = inputs[:5]
    request = {"inputs": [{"name": "input", "shape": [5, 8], "datatype": "FP32"}]}
    request["inputs"][0]["data"] = rows.ravel().tolist()
    with TestClient(app) as client:
        response = client.post("/v2/models/mlp/infer", json=request)
        (output,) = response.json()["outputs"]
        assert output["shape"] == [5, 3] and output["name"] == "output0"
        got = np.asarray(output["data"], np.float32).reshape(5, 3)
        assert_allclose(got, direct(make_mlp(), rows), rtol=1e-5)
        bad = {"inputs": [{"name": "input", "shape": [5], "datatype": "FP32", "data": [0] * 5}]}
        wrong = client.post("/v2/models/mlp/infer", json=bad)
        assert wrong.status_code == 400
        assert "input 'input': expected shape (8)" in wrong.json()["error"]


class SlowCheck(mds.TorchHandler):
    """The handler's own check, made slow: the request path calls it on the loop."""

    def check(self, request: Any) -> Any:
        # Busy for 20 ms of the loop's clock (a sleep would block the loop).
        until = time.monotonic() + 0.02
        while time.monotonic() < until:
            pass
        return super().check(request)


# asyncio: trio's virtual clock does not move while the loop is busy.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_check_counts_as_preprocess_and_its_time_is_not_queueing(
    inputs: np.ndarray,
) -> None:
    handler = SlowCheck(make_mlp, examples=[np.zeros(8, np.float32)])
    async with mds.ModelRuntime(handler, BATCHED) as model:
        traced = await model.serve(inputs[0], timeout=30.0, trace=True)
        trace = traced.trace
        # The parts are measured one after the other: they never add up to more.
        parts = trace.preprocess_seconds + trace.queue_wait + trace.infer_seconds
        assert parts <= trace.total_seconds + 1e-6, trace
        assert trace.preprocess_seconds >= 0.02
        # A deadline that passes during the check: refused before it is queued.
        with pytest.raises(mds.DeadlineExceeded, match="before it was queued"):
            await model.serve(inputs[0], timeout=0.005)
        assert model.statistics().queued == 0


async def test_the_handlers_own_preprocess_still_awaits_as_before(inputs: np.ndarray) -> None:
    handler = mds.TorchHandler(make_mlp, examples=[np.zeros(8, np.float32)])
    async with mds.ModelRuntime(handler, BATCHED):
        checked = await handler.preprocess(request=inputs[0].tolist())
        assert checked.dtype == np.float32 and checked.shape == (8,)
        with pytest.raises(mds.InvalidInput, match="expected shape"):
            await handler.preprocess(np.zeros(3, np.float32))


def counted(step: Any) -> Any:
    @functools.wraps(step)
    async def wrapper(self: Any, request: Any) -> Any:
        wrapper.calls += 1  # type: ignore[attr-defined]
        return await step(self, request)

    wrapper.calls = 0  # type: ignore[attr-defined]
    return wrapper


class Wrapped(mds.TorchHandler):
    preprocess = counted(mds.TorchHandler.preprocess)


async def test_a_wrapper_of_the_handlers_preprocess_runs(inputs: np.ndarray) -> None:
    spec = mds.TensorSpec(name="input", dtype="float32", shape=(8,))
    handler = Wrapped(make_mlp, inputs=[spec])
    async with mds.ModelRuntime(handler, BATCHED) as model:
        await model.serve(inputs[0])
        with pytest.raises(mds.InvalidInput):
            await model.serve(np.zeros(3, np.float32))
    assert Wrapped.preprocess.calls >= 2  # type: ignore[attr-defined]


class Request(Mapping[str, Any]):
    """A Mapping whose keys() is a plain list, not a set-like view."""

    def __init__(self, **values: Any) -> None:
        self._values = values

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> Any:  # type: ignore[override]
        return list(self._values)


async def test_any_mapping_serves_as_a_request(inputs: np.ndarray) -> None:
    handler = mds.TorchHandler(make_mlp, examples=[{"input": np.zeros(8, np.float32)}])
    async with mds.ModelRuntime(handler, BATCHED) as model:
        result = await model.serve(Request(input=inputs[0]))
        assert_allclose(result, direct(make_mlp(), inputs[:1])[0], rtol=1e-5)
        with pytest.raises(mds.InvalidInput, match="no input 'other'"):
            await model.serve(Request(input=inputs[0], other=inputs[1]))
