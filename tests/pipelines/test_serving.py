"""Serving pipelines: the path a request takes, its errors, deadlines, traces, health."""

from __future__ import annotations

import random
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import numpy as np
import pytest

import mds

from ..waiting import eventually, within


class Scale(mds.ModelHandler[float, float]):
    """A batched model: multiplies by its factor; fails on 13.

    Its infer is async: on trio's mock clock, a thread would let virtual time
    jump past the tests' deadlines while it runs.
    """

    def __init__(self, factor: float = 2.0) -> None:
        self.factor = factor

    async def infer(self, batch: Sequence[float]) -> list[Any]:
        return [ValueError("unlucky 13") if x == 13 else x * self.factor for x in batch]


def batched(factor: float = 2.0, size: int = 16) -> tuple[Any, mds.ModelConfig]:
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=size))
    return (lambda: Scale(factor)), config


def scoring() -> mds.Pipeline:
    """features -> model -> business logic."""

    def features(request: dict[str, Any]) -> float:
        return float(request["amount"]) / 100

    async def decide(score: float, request: dict[str, Any]) -> dict[str, Any]:
        return {"id": request["id"], "score": score, "flag": score > 1.0}

    handler, config = batched(factor=2.0)
    return mds.Pipeline(
        "scoring",
        [
            mds.Node.function("features", features),
            mds.Node.model("model", handler, config),
            mds.Node.function("decide", decide),
        ],
    )


async def test_a_pipeline_is_served_by_name_like_a_model() -> None:
    runtime = mds.Runtime()
    runtime.add_pipeline(scoring())
    async with runtime:
        assert sorted(runtime.models) == ["scoring.model"]
        assert await mds.serve("scoring", {"id": 1, "amount": 80}) == {
            "id": 1,
            "score": 1.6,
            "flag": True,
        }
        results = await _gather(
            [lambda i=i: mds.serve("scoring", {"id": i, "amount": i}) for i in range(100)]
        )
        assert [r["score"] for r in results] == [i / 50 for i in range(100)]
        assert runtime.models["scoring.model"].statistics().mean_batch_size > 1
        health = await runtime.health()
        assert health.ready and health.pipelines["scoring"].ready
        assert health.pipelines["scoring"].nodes == {"model": True}


async def _gather(calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    results: list[Any] = [None] * len(calls)

    async def one(index: int) -> None:
        results[index] = await calls[index]()

    async with anyio.create_task_group() as tasks:
        for index in range(len(calls)):
            tasks.start_soon(one, index)
    return results


async def test_values_pass_between_nodes_in_process_unchanged() -> None:
    seen: list[Any] = []
    array = np.arange(6.0)

    def first(request: Any) -> np.ndarray:
        return array

    def second(value: np.ndarray) -> np.ndarray:
        seen.append(value)
        return value

    runtime = mds.Runtime()
    runtime.add_pipeline(
        mds.Pipeline("p", [mds.Node.function("a", first), mds.Node.function("b", second)])
    )
    async with runtime:
        assert await runtime.serve("p", None) is array
    assert seen[0] is array  # no copy, no serialisation


def router_pipeline() -> mds.Pipeline:
    image, config = batched(factor=10.0)
    text, _ = batched(factor=-1.0)
    return mds.Pipeline(
        "router",
        [
            mds.Node.router(
                "route", "request.kind", {"image": "image", "text": "text"}, default="other"
            ),
            mds.Node.function("other", lambda r: 0.0, next=None),
            mds.Node.model("image", image, config, next="finish"),
            mds.Node.model("text", text, config),
            mds.Node.function("finish", lambda x: {"out": x}),
        ],
        start="route",
    )


async def test_a_router_forwards_by_a_value_in_the_request_with_a_default() -> None:
    pipeline = mds.Pipeline(
        "wrap",
        [mds.Node.function("unwrap", lambda r: r["x"], next="route")]
        + [node for node in router_pipeline().nodes.values()],
    )
    runtime = mds.Runtime()
    runtime.add_pipeline(pipeline)
    async with runtime:
        assert await runtime.serve("wrap", {"kind": "image", "x": 2.0}) == {"out": 20.0}
        assert await runtime.serve("wrap", {"kind": "text", "x": 2.0}) == {"out": -2.0}
        assert await runtime.serve("wrap", {"kind": "audio", "x": 2.0}) == 0.0
        assert await runtime.serve("wrap", {"x": 2.0}) == 0.0  # no value: the default
        traced = await runtime.serve("wrap", {"kind": "image", "x": 1.0}, trace=True)
        assert traced.trace.path == ("unwrap", "route", "image", "finish")
        assert traced.trace.nodes[1].route == "image"


async def test_a_router_without_a_default_rejects_an_unknown_value() -> None:
    pipeline = mds.Pipeline(
        "p",
        [
            mds.Node.router("route", "input.1", {"a": "x"}),
            mds.Node.function("x", lambda v: v[0]),
        ],
    )
    by_function = mds.Pipeline(
        "q",
        [
            mds.Node.router("route", lambda value, request: value % 2, {"0": "even", "1": "odd"}),
            mds.Node.function("even", lambda v: "even", next=None),
            mds.Node.function("odd", lambda v: "odd", next=None),
        ],
    )
    runtime = mds.Runtime()
    runtime.add_pipeline(pipeline)
    runtime.add_pipeline(by_function)
    async with runtime:
        assert await runtime.serve("p", (5, "a")) == 5
        with pytest.raises(mds.InvalidInput) as caught:
            await runtime.serve("p", (5, "b"))
        assert str(caught.value) == (
            "pipeline 'p', node 'route': no route for this request (input.1 is 'b'); routes: 'a'"
        )
        with pytest.raises(mds.InvalidInput, match=r"\(no value at input.1\)"):
            await runtime.serve("p", (5,))
        assert [await runtime.serve("q", n) for n in (1, 2)] == ["odd", "even"]
        with pytest.raises(mds.InvalidInput, match=r"node 'route': the router's function failed"):
            await runtime.serve("q", "text")


def ensemble(join: Callable[[dict[str, Any]], Any] | None) -> mds.Pipeline:
    double, config = batched(factor=2.0)
    triple, _ = batched(factor=3.0)
    return mds.Pipeline(
        "ensemble",
        [
            mds.Node.fan_out("both", ["double", "triple"], join=join),
            mds.Node.model("double", double, config),
            mds.Node.model("triple", triple, config),
        ],
    )


async def test_a_fan_out_runs_its_branches_on_the_same_input_and_joins_them() -> None:
    runtime = mds.Runtime()
    runtime.add_pipeline(ensemble(join=None))
    async with runtime:
        assert await runtime.serve("ensemble", 1.0) == {"double": 2.0, "triple": 3.0}
        traced = await runtime.serve("ensemble", 2.0, trace=True)
        (node,) = traced.trace.nodes
        assert node.kind == "fan_out" and [b.node for b in node.branches] == ["double", "triple"]
        assert all(b.call is not None and b.call.batch_size >= 1 for b in node.branches)
        assert all(0 <= b.started <= node.seconds for b in node.branches)

    runtime = mds.Runtime()
    runtime.add_pipeline(ensemble(join=lambda outputs: sum(outputs.values()) / len(outputs)))
    async with runtime:
        assert await runtime.serve("ensemble", 2.0) == 5.0


async def test_a_fan_outs_branches_run_at_once() -> None:
    # Each branch waits until both run: run one after the other, they never would.
    running = 0
    both = anyio.Event()

    async def branch(value: float) -> float:
        nonlocal running
        running += 1
        if running == 2:
            both.set()
        await both.wait()
        return value

    pipeline = mds.Pipeline(
        "p",
        [
            mds.Node.fan_out("both", ["a", "b"]),
            mds.Node.function("a", branch),
            mds.Node.function("b", branch),
        ],
    )
    runtime = mds.Runtime()
    runtime.add_pipeline(pipeline)
    async with runtime:
        async with within(10):
            assert await runtime.serve("p", 1.0) == {"a": 1.0, "b": 1.0}


async def test_a_failing_branch_fails_the_call_and_cancels_the_others() -> None:
    cancelled = anyio.Event()

    async def slow(value: float) -> float:
        try:
            await anyio.sleep(10)
        except anyio.get_cancelled_exc_class():
            cancelled.set()
            raise
        return value

    async def broken(value: float) -> float:
        raise KeyError("no such feature")

    pipeline = mds.Pipeline(
        "p",
        [
            mds.Node.fan_out("both", ["slow", "broken"]),
            mds.Node.function("slow", slow),
            mds.Node.function("broken", broken),
        ],
    )
    runtime = mds.Runtime()
    runtime.add_pipeline(pipeline)
    async with runtime:
        with anyio.fail_after(5), pytest.raises(mds.InferenceError) as caught:
            await runtime.serve("p", 1.0)
        assert str(caught.value) == "pipeline 'p', node 'broken': KeyError: 'no such feature'"
        assert isinstance(caught.value.__cause__, KeyError)
        assert cancelled.is_set()


async def test_an_error_in_a_node_names_the_pipeline_and_the_node_and_fails_alone() -> None:
    runtime = mds.Runtime()
    runtime.add_pipeline(scoring())
    async with runtime:
        calls = [lambda i=i: _answer(runtime, {"id": i, "amount": i * 100}) for i in (1, 13, 2)]
        one, bad, two = await _gather(calls)
        assert one["score"] == 2.0 and two["score"] == 4.0
        assert isinstance(bad, mds.InferenceError)
        assert str(bad).startswith(
            "pipeline 'scoring', node 'model', model 'scoring.model' (version 1), instance 0: "
        )
        assert (bad.pipeline, bad.node, bad.model) == ("scoring", "model", "scoring.model")
        assert "ValueError: unlucky 13" in str(bad)
        missing = await _answer(runtime, {"id": 1})
        assert isinstance(missing, mds.InferenceError)
        assert str(missing) == "pipeline 'scoring', node 'features': KeyError: 'amount'"
        assert (await runtime.serve("scoring", {"id": 5, "amount": 50}))["score"] == 1.0


async def _answer(runtime: mds.Runtime, request: Any) -> Any:
    try:
        return await runtime.serve("scoring", request)
    except mds.MdsError as exc:
        return exc


@pytest.mark.virtual_time
async def test_a_deadline_covers_the_whole_pipeline_and_names_the_node() -> None:
    async def slow(value: float) -> float:
        await anyio.sleep(0.3)
        return value

    handler, config = batched()
    pipeline = mds.Pipeline(
        "p",
        [
            mds.Node.model("model", handler, config),
            mds.Node.function("slow", slow),
            mds.Node.model("after", handler, config),
        ],
        timeout=0.1,
    )
    runtime = mds.Runtime()
    runtime.add_pipeline(pipeline)
    async with runtime:
        began = anyio.current_time()
        with pytest.raises(mds.DeadlineExceeded) as caught:
            await runtime.serve("p", 1.0)
        assert anyio.current_time() - began < 0.25
        assert str(caught.value) == (
            "pipeline 'p', node 'slow': the pipeline's deadline passed in this function"
        )
        with pytest.raises(mds.DeadlineExceeded, match="node 'slow'"):
            await runtime.serve("p", 1.0, timeout=0.05)
        assert await runtime.serve("p", 1.0, timeout=2.0) == 4.0
        assert runtime.models["p.after"].statistics().requests == 1  # only the one in time


async def test_a_caller_leaving_cancels_the_running_node() -> None:
    started, gate = threading.Event(), threading.Event()

    class Held(mds.ModelHandler[float, float]):
        def infer(self, batch: Sequence[float]) -> list[float]:
            started.set()
            gate.wait(10)
            return list(batch)

    pipeline = mds.Pipeline(
        "p", [mds.Node.model("held", Held()), mds.Node.function("after", lambda x: x + 1)]
    )
    runtime = mds.Runtime()
    runtime.add_pipeline(pipeline)
    async with runtime:
        async with anyio.create_task_group() as tasks:
            scope = anyio.CancelScope()

            async def caller() -> None:
                with scope:
                    await runtime.serve("p", 1.0)

            tasks.start_soon(caller)
            assert await anyio.to_thread.run_sync(started.wait, 10)
            scope.cancel()
        held = runtime.models["p.held"]
        await eventually(lambda: held.statistics().cancelled == 1, "counted the cancel")
        gate.set()
        assert await runtime.serve("p", 2.0) == 3.0


async def test_readiness_is_every_node_and_names_the_one_that_is_not() -> None:
    class Broken(mds.ModelHandler[float, float]):
        def init(self, context: mds.ModelContext) -> None:
            raise OSError("weights missing")

        def infer(self, batch: Sequence[float]) -> list[float]:
            return list(batch)

    pipeline = mds.Pipeline(
        "p", [mds.Node.function("f", lambda x: x), mds.Node.model("broken", Broken)]
    )
    runtime = mds.Runtime(fail_fast=False)
    runtime.add_pipeline(pipeline)
    async with runtime:
        health = await runtime.health()
        report = health.pipelines["p"]
        assert not report.ready and report.nodes == {"broken": False}
        assert report.reason is not None
        assert report.reason.startswith("node 'broken' (model 'p.broken') is not ready:")
        assert "weights missing" in report.reason
        with pytest.raises(mds.NotReady) as caught:
            await mds.serve("p", 1.0)
        assert str(caught.value) == (
            "pipeline 'p': not ready: node 'broken' (model 'p.broken') is failed"
        )


async def test_a_node_can_use_a_model_the_runtime_already_serves() -> None:
    runtime = mds.Runtime()
    handler, config = batched(factor=5.0)
    runtime.add_model("shared", handler, config)
    runtime.add_pipeline(
        mds.Pipeline("p", [mds.Node.model("m", model="shared"), mds.Node.function("f", abs)])
    )
    with pytest.raises(mds.ConfigError, match=r"node 'm': no model named 'nothing'"):
        runtime.add_pipeline(mds.Pipeline("q", [mds.Node.model("m", model="nothing")]))
    with pytest.raises(mds.ConfigError, match=r"a model or pipeline named 'shared'"):
        runtime.add_pipeline(mds.Pipeline("shared", [mds.Node.function("f", abs)]))
    async with runtime:
        assert await runtime.serve("p", -1.0) == 5.0
        assert await runtime.serve("shared", 1.0) == 5.0
        with pytest.raises(mds.ModelNotFound, match=r"no model named 'x'.*pipelines: 'p'"):
            await runtime.serve("x", 1.0)


def test_a_pipeline_serves_from_threads_through_serve_sync() -> None:
    runtime = mds.Runtime()
    runtime.add_pipeline(scoring())
    runtime.start_sync()
    try:
        results: list[Any] = []

        def call(i: int) -> None:
            results.append(mds.serve_sync("scoring", {"id": i, "amount": 100}))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(r["id"] for r in results) == list(range(8))
        assert runtime.health_sync().pipelines["scoring"].ready
    finally:
        runtime.stop_sync()


async def test_many_callers_with_cancellations_all_get_one_answer() -> None:
    runtime = mds.Runtime()
    runtime.add_pipeline(ensemble(join=lambda outputs: outputs["double"] + outputs["triple"]))
    rng = random.Random(0)
    answered: list[Any] = []
    left = 0
    async with runtime:

        async def caller(x: float) -> None:
            nonlocal left
            with anyio.CancelScope() as scope:
                scope.deadline = anyio.current_time() + rng.choice([0.0005, 0.005, 10.0])
                answered.append((x, await runtime.serve("ensemble", x)))
            if scope.cancelled_caught:
                left += 1

        async with anyio.create_task_group() as tasks:
            for i in range(300):
                tasks.start_soon(caller, i + 0.5)  # never the unlucky 13
        assert all(out == x * 5 for x, out in answered)
        assert len(answered) + left == 300
        assert await runtime.serve("ensemble", 1.0) == 5.0
        for model in runtime.models.values():
            stats = model.statistics()
            assert stats.in_flight == 0 and stats.queued == 0
