"""A failing item fails alone; user code never kills the batcher."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import numpy as np
import pytest

import mds

from ..waiting import eventually

Serve = Callable[[mds.ModelRuntime[Any, Any], list[Any]], Awaitable[list[Any]]]


async def while_busy(
    model: mds.ModelRuntime[Any, Any], recorder: Any, requests: list[Any], serve_all: Serve
) -> list[Any]:
    """Serve ``requests`` all at once while the model computes (and holds) a first batch."""
    results: list[Any] = []
    async with anyio.create_task_group() as tasks:
        await recorder.busy(tasks, model, 100)

        async def everything() -> None:
            results.extend(await serve_all(model, requests))

        tasks.start_soon(everything)
        await anyio.wait_all_tasks_blocked()
        recorder.release()
    return results


def gated_model(recorder: Any, **batching: Any) -> mds.ModelRuntime[Any, Any]:
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=16, **batching))
    return mds.ModelRuntime(recorder, config)


async def test_a_raising_infer_fails_only_the_items_at_fault(
    recorder: Any, serve_all: Serve
) -> None:
    recorder.fail = {5, 11}
    async with gated_model(recorder) as model:
        answers = await while_busy(model, recorder, list(range(16)), serve_all)
        stats = model.statistics()
    for i, answer in enumerate(answers):
        if i in (5, 11):
            assert isinstance(answer, mds.InferenceError)
            assert str(answer) == (
                f"model 'Recorder' (version 1), instance 0: infer failed on a batch "
                f"of 1: RuntimeError: cannot compute [{i}]"
            )
        else:
            assert answer == i
    assert stats.isolation_splits > 0
    assert stats.completed == 15 and stats.failed == 2


async def test_isolation_can_be_turned_off(recorder: Any, serve_all: Serve) -> None:
    recorder.fail = {3}
    async with gated_model(recorder, isolate_failures=False) as model:
        answers = await while_busy(model, recorder, list(range(8)), serve_all)
        assert model.statistics().isolation_splits == 0
    assert all(isinstance(a, mds.InferenceError) for a in answers)
    assert "infer failed on a batch of 8" in str(answers[0])


class Images(mds.ModelHandler[Any, float]):
    """Stacks 2x2 images; collation fails on a wrong shape, split on a marker."""

    collator = mds.Stack()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return batch.reshape(len(batch), -1).sum(axis=1)

    def split(self, outputs: np.ndarray, batch: Any) -> Sequence[Any]:
        if (outputs == -1).any():
            raise ValueError("a sum of -1 cannot be split")
        return super().split(outputs, batch)


async def test_collate_and_split_failures_are_isolated_too(serve_all: Serve) -> None:
    image = np.ones((2, 2))
    requests = [image, image * 2, np.ones((3, 3)), image * 3, np.full((2, 2), -0.25)]
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=8))
    async with mds.ModelRuntime(Images(), config) as model:
        model.set_batching(mds.BatchingConfig(max_batch_size=8, max_queue_delay=0.0))
        answers = await serve_all(model, requests)
        assert await model.serve(image) == 4.0  # it serves on
    # The 3x3 image could not be stacked with the others; alone it is fine.
    assert answers[:4] == [4.0, 8.0, 9.0, 12.0]
    assert isinstance(answers[4], mds.InferenceError)
    assert "a sum of -1 cannot be split" in str(answers[4])


class Fragile(mds.ModelHandler[int, int]):
    """Fails in the hook that each request names."""

    def cost(self, item: int) -> int:
        if item == 1:
            raise KeyError("no cost")
        return 1

    def collate(self, items: Sequence[int]) -> list[int]:
        if 2 in items:
            raise TypeError("cannot collate 2")
        return list(items)

    async def infer(self, batch: list[int]) -> list[Any]:
        if 3 in batch:
            raise ZeroDivisionError("3 divides nothing")
        return [ValueError("4 fails alone") if x == 4 else x * 10 for x in batch]

    def split(self, outputs: Any, batch: Any) -> Sequence[Any]:
        if 50 in outputs:
            raise IndexError("cannot split 5")
        return list(outputs)


async def test_no_user_code_error_stops_the_batcher(serve_all: Serve) -> None:
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=8))
    async with mds.ModelRuntime(Fragile(), config) as model:
        answers = await serve_all(model, [0, 1, 2, 3, 4, 5, 6])
        assert await serve_all(model, [7, 8]) == [70, 80]
    assert answers[0] == 0 and answers[6] == 60
    kinds = {i: type(a).__name__ for i, a in enumerate(answers) if isinstance(a, Exception)}
    assert kinds == {
        1: "InvalidInput",
        2: "InferenceError",
        3: "InferenceError",
        4: "InferenceError",
        5: "InferenceError",
    }
    assert "no cost" in str(answers[1])
    assert "cannot collate 2" in str(answers[2])
    assert "3 divides nothing" in str(answers[3])
    assert "4 fails alone" in str(answers[4])
    assert "cannot split 5" in str(answers[5])


class Rejected(mds.InvalidInput):
    """A handler's own error class, with a constructor of its own."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"[{code}] {text}")
        self.code = code


async def test_a_handlers_own_error_classes_fail_their_items_and_nothing_else(
    serve_all: Serve,
) -> None:
    class Strict(mds.ModelHandler[int, int]):
        async def infer(self, batch: Sequence[int]) -> list[Any]:
            if 13 in batch:
                raise Rejected(13, "thirteen spoils the batch")
            return [Rejected(x, "odd") if x % 2 else x for x in batch]

    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=8), timeout=30)
    async with mds.ModelRuntime(Strict(), config, name="strict") as model:
        answers = await serve_all(model, [0, 1, 2, 13])
        assert await serve_all(model, [4, 6]) == [4, 6]  # the batcher serves on
    assert answers[0] == 0 and answers[2] == 2
    for index, code in ((1, 1), (3, 13)):
        error = answers[index]
        assert isinstance(error, Rejected) and error.code == code  # its own class, a 400
        assert (error.model, error.instance) == ("strict", 0)


async def test_a_stop_that_cannot_wait_still_lets_a_running_infer_finish_first() -> None:
    """Teardown never overlaps a plain infer that is still running in its thread."""
    events: list[str] = []
    release = threading.Event()

    class Blocking(mds.ModelHandler[int, int]):
        def infer(self, batch: Sequence[int]) -> list[int]:
            events.append("infer started")
            release.wait(5)
            events.append("infer ended")
            return list(batch)

        def teardown(self) -> None:
            events.append("teardown")

    config = mds.ModelConfig(drain_timeout=0.05)
    answers: list[Any] = []

    async def call(model: mds.ModelRuntime[int, int]) -> None:
        try:
            answers.append(await model.serve(1))
        except mds.MdsError as exc:
            answers.append(exc)

    async with anyio.create_task_group() as tasks:
        async with mds.ModelRuntime(Blocking(), config) as model:
            tasks.start_soon(call, model)
            # infer runs in a plain thread: poll for it to start.
            await eventually(lambda: "infer started" in events, "started infer")
            # Leaving now: the drain times out, the worker is cancelled mid-infer.
            threading.Timer(0.2, release.set).start()
    assert events == ["infer started", "infer ended", "teardown"]
    # One answer: the result if it was back before the stop took effect.
    assert len(answers) == 1 and (answers[0] == 1 or isinstance(answers[0], mds.Unavailable))


@pytest.mark.virtual_time
async def test_deadlines_are_kept_while_a_failing_batch_is_split() -> None:
    # Each try takes a second and a poisoned item makes it fail, so finding it
    # takes several; every caller still hears at its deadline, to the instant.
    class Poisoned(mds.ModelHandler[int, int]):
        async def infer(self, batch: Sequence[int]) -> list[int]:
            await anyio.sleep(1.0)
            if 0 in batch:
                raise RuntimeError("poisoned")
            return list(batch)

    answered: dict[int, float] = {}
    config = mds.ModelConfig(timeout=0.5, batching=mds.BatchingConfig(max_batch_size=8))
    async with mds.ModelRuntime(Poisoned(), config) as model:
        began = anyio.current_time()

        async def call(x: int) -> None:
            with pytest.raises(mds.DeadlineExceeded, match="deadline passed while"):
                await model.serve(x)
            answered[x] = anyio.current_time() - began

        async with anyio.create_task_group() as tasks:
            for x in range(8):
                tasks.start_soon(call, x)
        assert model.statistics().isolation_splits <= 1  # still on the first tries
    assert sorted(answered) == list(range(8))
    assert all(abs(when - 0.5) < 1e-3 for when in answered.values()), answered
