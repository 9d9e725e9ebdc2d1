"""Streaming handlers: a postprocess that yields, read with stream / stream_sync."""

from __future__ import annotations

import random
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing
from typing import Any

import anyio
import pytest

import mds


class Words(mds.ModelHandler[str, str]):
    """Batched like any model; postprocess yields one word at a time."""

    def __init__(self) -> None:
        self.closed = 0

    def infer(self, batch: Sequence[str]) -> list[str]:
        return [text.upper() for text in batch]

    def postprocess(self, output: str) -> Iterator[str]:
        try:
            for word in output.split():
                if word == "BOOM":
                    raise ValueError("cannot say boom")
                yield word
        finally:
            self.closed += 1


class Paced(mds.ModelHandler[int, int]):
    """An async postprocess that waits for a go-ahead between chunks."""

    def __init__(self) -> None:
        self.go = anyio.Event()

    async def infer(self, batch: Sequence[int]) -> list[int]:
        return list(batch)

    async def postprocess(self, output: int) -> AsyncIterator[int]:
        yield 0
        await self.go.wait()
        for i in range(1, output):
            yield i


async def test_chunks_come_in_order_and_serve_gives_them_all() -> None:
    handler = Words()
    async with mds.ModelRuntime(handler, name="words") as model:
        assert model.streams
        assert [c async for c in model.stream("one two three")] == ["ONE", "TWO", "THREE"]
        assert await model.serve("a b") == ["A", "B"]
        stats = model.statistics()
        assert (stats.requests, stats.completed, stats.in_flight) == (2, 2, 0)
    assert handler.closed == 2


async def test_a_model_that_does_not_stream_gives_one_chunk(doubler: Any) -> None:
    runtime = mds.Runtime()
    runtime.add_model("double", doubler)
    runtime.add_pipeline(
        mds.Pipeline("twice", [mds.Node.model("d", model="double"), mds.Node.function("f", abs)])
    )
    async with runtime:
        assert not runtime.model("double").streams
        assert [c async for c in runtime.stream("double", 2.0)] == [4.0]
        assert [c async for c in runtime.stream("twice", -2.0)] == [4.0]


async def test_an_error_midway_ends_the_stream_and_is_counted() -> None:
    async with mds.ModelRuntime(Words(), name="words") as model:
        got: list[str] = []
        with pytest.raises(mds.InferenceError, match="postprocess failed while streaming: Value"):
            async for chunk in model.stream("a b boom c"):
                got.append(chunk)
        assert got == ["A", "B"]
        stats = model.statistics()
        assert (stats.completed, stats.failed, stats.errors) == (0, 1, {"InferenceError": 1})


async def test_leaving_early_closes_the_generator_and_counts_a_cancel() -> None:
    handler = Words()
    async with mds.ModelRuntime(handler, name="words") as model:
        async with aclosing(model.stream("a b c d")) as stream:
            async for chunk in stream:
                assert chunk == "A"
                break
        assert handler.closed == 1
        stats = model.statistics()
        assert (stats.cancelled, stats.in_flight) == (1, 0)


@pytest.mark.virtual_time  # the deadline must pass between chunks, not before the first
async def test_the_deadline_covers_the_whole_stream() -> None:
    handler = Paced()
    async with mds.ModelRuntime(handler, name="paced") as model:
        got: list[int] = []
        with pytest.raises(mds.DeadlineExceeded, match="deadline passed in postprocess"):
            async for chunk in model.stream(3, timeout=0.2):
                got.append(chunk)
        assert got == [0]


async def test_a_draining_model_waits_for_open_streams() -> None:
    handler = Paced()
    model = mds.ModelRuntime(handler, name="paced", config=mds.ModelConfig(drain_timeout=30))
    got: list[int] = []
    first = anyio.Event()
    async with anyio.create_task_group() as tasks:
        async with model:

            async def read() -> None:
                async with aclosing(model.stream(4)) as stream:
                    async for chunk in stream:
                        got.append(chunk)
                        first.set()

            async def release() -> None:
                await anyio.wait_all_tasks_blocked()
                assert model.state is mds.ModelState.DRAINING  # still, with a stream open
                handler.go.set()

            tasks.start_soon(read)
            await first.wait()
            tasks.start_soon(release)
        # Leaving the block drained: the stream finished first.
        assert got == [0, 1, 2, 3]
        assert model.state is mds.ModelState.STOPPED
    assert model.statistics().completed == 1


async def test_many_streams_at_once_with_callers_leaving() -> None:
    handler = Words()
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=8))
    async with mds.ModelRuntime(handler, config, name="words") as model:
        results: dict[int, list[str]] = {}
        rng = random.Random(7)

        async def one(i: int, give_up: bool) -> None:
            with anyio.move_on_after(0 if give_up else 30):
                async with aclosing(model.stream(f"w{i} x{i} y{i}")) as stream:
                    results[i] = [c async for c in stream]

        async with anyio.create_task_group() as tasks:
            for i in range(200):
                tasks.start_soon(one, i, rng.random() < 0.2)
        for i, chunks in results.items():
            assert chunks == [f"W{i}", f"X{i}", f"Y{i}"]
        stats = model.statistics()
        assert stats.in_flight == 0
        assert stats.completed == len(results)
        assert stats.completed + stats.cancelled == stats.requests == 200


def test_stream_sync_from_threads() -> None:
    handler = Words()
    runtime = mds.Runtime()
    runtime.add_model("words", lambda: handler)
    with runtime:
        outputs: dict[int, list[str]] = {}

        def read(i: int) -> None:
            outputs[i] = list(runtime.stream_sync("words", f"a{i} b{i}"))

        threads = [threading.Thread(target=read, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert outputs == {i: [f"A{i}", f"B{i}"] for i in range(16)}
        early = runtime.stream_sync("words", "a b c")
        assert next(early) == "A"
        early.close()
        assert runtime.model("words").statistics().cancelled == 1
        with pytest.raises(mds.ModelNotFound):
            next(runtime.stream_sync("nothing", "a"))
