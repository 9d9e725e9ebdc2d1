"""``mds.serve`` and the runtime, from every kind of caller."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import pytest

import mds


def make_runtime(doubler: Any, **config: Any) -> mds.Runtime:
    runtime = mds.Runtime()
    runtime.add_model("doubler", doubler, mds.ModelConfig(**config))
    return runtime


async def test_serve_from_async_code_on_either_backend(doubler: Any) -> None:
    async with make_runtime(doubler, batching=mds.BatchingConfig(max_batch_size=8)):
        results: dict[int, float] = {}

        async def call(i: int) -> None:
            results[i] = await mds.serve("doubler", float(i))

        async with anyio.create_task_group() as tasks:
            for i in range(200):
                tasks.start_soon(call, i)
    assert results == {i: 2.0 * i for i in range(200)}


def test_serve_sync_from_100_concurrent_threads(doubler: Any) -> None:
    runtime = make_runtime(doubler, instances=2, batching=mds.BatchingConfig(max_batch_size=16))
    loop_threads: set[str] = set()

    def call(i: int) -> float:
        loop_threads.add(threading.current_thread().name)
        return float(mds.serve_sync("doubler", float(i)))

    with runtime:
        with ThreadPoolExecutor(max_workers=100) as pool:
            results = list(pool.map(call, range(1000)))
        stats = runtime.statistics()["doubler"]
    assert results == [2.0 * i for i in range(1000)]
    assert stats.completed == 1000 and stats.failed == 0
    # Batches formed across threads: fewer infer calls than requests.
    assert stats.batches < 1000


def test_the_sync_facade_reuses_one_event_loop(doubler: Any) -> None:
    class WhichLoop(mds.ModelHandler[None, int]):
        async def infer(self, batch: Sequence[None]) -> list[int]:
            return [threading.get_ident() for _ in batch]

    first, second = mds.Runtime(), mds.Runtime()
    first.add_model("which", WhichLoop)
    second.add_model("which", WhichLoop)
    with first, second:
        seen = {first.serve_sync("which", None) for _ in range(20)}
        seen |= {second.serve_sync("which", None) for _ in range(20)}
    assert len(seen) == 1
    assert seen != {threading.get_ident()}


def test_serve_sync_inside_a_running_event_loop(doubler: Any) -> None:
    """Like a notebook cell: sync code called while this thread's loop runs."""

    async def cell() -> float:
        return float(mds.serve_sync("doubler", 21.0))

    with make_runtime(doubler):
        assert asyncio.run(cell()) == 42.0


def test_async_serve_from_a_loop_other_than_the_runtimes(doubler: Any) -> None:
    async def app(backend_name: str) -> list[float]:
        async with anyio.create_task_group() as tasks:
            results: list[float] = []

            async def call(i: int) -> None:
                results.append(await mds.serve("doubler", float(i)))

            for i in range(20):
                tasks.start_soon(call, i)
        return sorted(results)

    with make_runtime(doubler):
        for backend in ("asyncio", "trio"):
            assert anyio.run(app, backend, backend=backend) == [2.0 * i for i in range(20)]


async def test_a_blocking_call_from_the_runtimes_own_loop_is_refused(doubler: Any) -> None:
    async with make_runtime(doubler) as runtime:
        with pytest.raises(mds.LifecycleError, match="would deadlock"):
            runtime.serve_sync("doubler", 1.0)


async def test_serve_without_a_running_runtime_says_so(doubler: Any) -> None:
    runtime = make_runtime(doubler)
    with pytest.raises(mds.NotReady, match="no mds runtime is running"):
        await mds.serve("doubler", 1.0)
    with pytest.raises(mds.NotReady, match=r"model 'doubler' .*: not ready: it is created"):
        await runtime.serve("doubler", 1.0)
    with pytest.raises(mds.NotReady, match="not running; start it first"):
        runtime.serve_sync("doubler", 1.0)


async def test_serve_raises_where_it_is_awaited_as_an_async_function_does(doubler: Any) -> None:
    # Making the call (to hand it to a task group, say) never raises; awaiting it does.
    call = mds.serve("doubler", 1.0)
    with pytest.raises(mds.NotReady, match="no mds runtime is running"):
        await call
    async with make_runtime(doubler) as runtime:
        for call in (
            mds.serve("nothing", 1.0),
            runtime.serve("nothing", 1.0),
            runtime.serve_many("nothing", [1.0]),
        ):
            with pytest.raises(mds.ModelNotFound, match="no model named 'nothing'"):
                await call
        assert await runtime.serve_many("doubler", [1.0, 2.0]) == [2.0, 4.0]


async def test_an_unknown_model_is_named_with_the_known_ones(doubler: Any) -> None:
    async with make_runtime(doubler):
        with pytest.raises(mds.ModelNotFound, match=r"no model named 'tripler'; .* 'doubler'"):
            await mds.serve("tripler", 1.0)


async def test_serve_uses_the_most_recently_started_runtime(doubler: Any) -> None:
    class Negator(mds.ModelHandler[float, float]):
        async def infer(self, batch: Sequence[float]) -> list[float]:
            return [-x for x in batch]

    outer, inner = make_runtime(doubler), mds.Runtime()
    inner.add_model("doubler", Negator)
    async with outer:
        assert await mds.serve("doubler", 1.0) == 2.0
        async with inner:
            assert mds.current_runtime() is inner
            assert await mds.serve("doubler", 1.0) == -1.0
        assert await mds.serve("doubler", 1.0) == 2.0


async def test_models_can_only_be_added_before_the_start(doubler: Any) -> None:
    runtime = make_runtime(doubler)
    with pytest.raises(mds.ConfigError, match="already added"):
        runtime.add_model("doubler", doubler)
    with pytest.raises(mds.ConfigError, match="name 'a b' is not allowed"):
        runtime.add_model("a b", doubler)
    async with runtime:
        with pytest.raises(mds.LifecycleError, match="add models before starting"):
            runtime.add_model("other", doubler)


class Broken(mds.ModelHandler[int, int]):
    def init(self, context: mds.ModelContext) -> None:
        raise OSError("no such file: model.onnx")

    def infer(self, batch: Sequence[int]) -> list[int]:
        return list(batch)


async def test_a_failed_model_fails_the_start_by_default(doubler: Any) -> None:
    runtime = make_runtime(doubler)
    runtime.add_model("broken", Broken)
    with pytest.raises(
        mds.LifecycleError,
        match=r"1 of 2 models failed to start: 'broken': init of instance 0 on cpu raised OSError",
    ):
        async with runtime:
            pass
    assert runtime.models["doubler"].state is mds.ModelState.STOPPED
    assert runtime.models["broken"].state is mds.ModelState.FAILED
    assert not runtime.running


async def test_without_fail_fast_the_others_serve_and_the_failed_one_can_retry(
    doubler: Any,
) -> None:
    runtime = mds.Runtime(fail_fast=False)
    runtime.add_model("doubler", doubler)
    attempts = []

    class FixedLater(Broken):
        def init(self, context: mds.ModelContext) -> None:
            attempts.append(context)
            if len(attempts) == 1:
                super().init(context)

    runtime.add_model("broken", FixedLater)
    async with runtime:
        health = await runtime.health()
        assert health.live and not health.ready
        assert health.models["broken"].reason == (
            "it is failed: init of instance 0 on cpu raised OSError: no such file: model.onnx"
        )
        assert health.models["doubler"].ready
        assert await runtime.serve("doubler", 2.0) == 4.0
        await runtime.start_model("broken")
        assert (await runtime.health()).ready
        assert await runtime.serve("broken", 3) == 3
        with pytest.raises(mds.LifecycleError, match="already ready"):
            await runtime.start_model("broken")
        await runtime.stop_model("broken")
        assert runtime.models["broken"].state is mds.ModelState.STOPPED
        with pytest.raises(mds.LifecycleError, match="not running"):
            await runtime.stop_model("broken")
        assert await runtime.serve("doubler", 1.0) == 2.0


async def test_leaving_on_an_error_stops_without_draining(doubler: Any) -> None:
    runtime = make_runtime(doubler)
    with pytest.raises(ZeroDivisionError):
        async with runtime:
            1 / 0  # noqa: B018
    assert runtime.models["doubler"].state is mds.ModelState.STOPPED
    assert not runtime.running
