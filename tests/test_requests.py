"""Each request gets exactly one answer: its own result or its own error."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import anyio
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mds

from .waiting import eventually


class Picky(mds.ModelHandler[dict[str, Any], float]):
    """Fails requests on demand, at the step each request names."""

    def __init__(self) -> None:
        self.computed: list[float] = []

    async def preprocess(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("fail") == "preprocess":
            raise ValueError(f"x must be a number, got {request['x']!r}")
        return request

    async def infer(self, batch: Sequence[dict[str, Any]]) -> list[Any]:
        self.computed.extend(item["x"] for item in batch)
        return [
            mds.InvalidInput("x is out of range") if item.get("fail") == "infer" else item
            for item in batch
        ]

    async def postprocess(self, output: dict[str, Any]) -> float:
        if output.get("fail") == "postprocess":
            raise KeyError("label")
        return float(output["x"]) * 2


def picky_model(**config: Any) -> mds.ModelRuntime[dict[str, Any], float]:
    config.setdefault("batching", mds.BatchingConfig(max_batch_size=16))
    return mds.ModelRuntime(Picky(), mds.ModelConfig(**config), name="picky")


async def test_failing_requests_fail_alone_among_many_that_succeed() -> None:
    fails = {3: "preprocess", 10: "infer", 17: "postprocess"}
    answers: dict[int, Any] = {}
    async with picky_model() as model:

        async def call(i: int) -> None:
            try:
                answers[i] = await model.serve({"x": i, "fail": fails.get(i)})
            except mds.MdsError as exc:
                answers[i] = exc

        async with anyio.create_task_group() as tasks:
            for i in range(40):
                tasks.start_soon(call, i)
        stats = model.statistics()
    for i in range(40):
        if i not in fails:
            assert answers[i] == 2.0 * i
    assert isinstance(answers[3], mds.InvalidInput)
    assert str(answers[3]) == (
        "model 'picky' (version 1): preprocess rejected the request: "
        "ValueError: x must be a number, got 3"
    )
    assert isinstance(answers[10], mds.InvalidInput)
    # An error the handler raises gets the same context as one mds raises.
    assert str(answers[10]) == "model 'picky' (version 1), instance 0: x is out of range"
    assert answers[10].message == "x is out of range"
    assert (answers[10].model, answers[10].version, answers[10].instance) == ("picky", "1", 0)
    assert isinstance(answers[17], mds.InferenceError)
    assert str(answers[17]) == "model 'picky' (version 1): postprocess failed: KeyError: 'label'"
    assert (stats.completed, stats.failed) == (37, 3)
    assert stats.errors == {"InvalidInput": 2, "InferenceError": 1}


async def test_infer_that_raises_fails_its_batch_and_the_model_serves_on() -> None:
    class Fragile(mds.ModelHandler[int, int]):
        async def infer(self, batch: Sequence[int]) -> list[int]:
            if 13 in batch:
                raise RuntimeError("CUDA error: device-side assert triggered")
            return list(batch)

    async with mds.ModelRuntime(Fragile()) as model:
        with pytest.raises(mds.InferenceError) as info:
            await model.serve(13)
        assert str(info.value) == (
            "model 'Fragile' (version 1), instance 0: infer failed on a batch of 1: "
            "RuntimeError: CUDA error: device-side assert triggered"
        )
        assert isinstance(info.value.__cause__, RuntimeError)
        assert await model.serve(12) == 12


@pytest.mark.parametrize(
    ("outputs", "problem"),
    [
        ([1], "infer returned 1 outputs for 2 items; it must return exactly one output per item"),
        ([1, 2, 3], "infer returned 3 outputs for 2 items"),
        (None, "infer returned NoneType; it must return a sequence"),
        ("ab", "infer returned str; it must return a sequence"),
    ],
)
async def test_a_wrong_number_of_outputs_names_the_handler_and_both_counts(
    outputs: Any, problem: str
) -> None:
    class Miscounted(mds.ModelHandler[int, int]):
        async def warmup(self) -> list[int]:
            return [1]

        async def infer(self, batch: Sequence[int]) -> Any:
            return outputs

    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=2), warmup_batch_sizes=(2,))
    with pytest.raises(mds.LifecycleError) as info:
        async with mds.ModelRuntime(Miscounted(), config, name="counted"):
            pass
    assert str(info.value).startswith("model 'counted' (version 1): failed to start: warm-up")
    assert problem in str(info.value)


class Exhausted(mds.ModelHandler[int, int]):
    """Plain steps (run in threads) that leak a StopIteration, as ``next()`` does."""

    def preprocess(self, request: int) -> int:
        if request < 0:
            return next(iter([]))
        return request

    def infer(self, batch: Sequence[int]) -> list[int]:
        if any(item == 13 for item in batch):
            next(iter([]))
        return list(batch)


async def test_a_stopiteration_from_a_thread_fails_its_request_and_nothing_hangs() -> None:
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=4), timeout=30.0)
    async with mds.ModelRuntime(Exhausted(), config) as model:
        results = await model.serve_many([1, -1, 13, 2])
        assert results[0] == 1 and results[3] == 2
        assert isinstance(results[1], mds.InvalidInput), results[1]
        assert "StopIteration" in str(results[1])
        assert isinstance(results[2], mds.InferenceError), results[2]
        assert await model.serve(3) == 3


async def test_an_array_output_is_split_into_rows() -> None:
    class Linear(mds.ModelHandler[list[float], list[float]]):
        async def infer(self, batch: Sequence[list[float]]) -> np.ndarray:
            return np.asarray(batch) @ np.array([[1.0, 0.0], [0.0, 2.0]])

        async def postprocess(self, output: np.ndarray) -> list[float]:
            return [float(v) for v in output]

    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=8))
    async with mds.ModelRuntime(Linear(), config) as model:
        results: dict[int, list[float]] = {}

        async def call(i: int) -> None:
            results[i] = await model.serve([float(i), 1.0])

        async with anyio.create_task_group() as tasks:
            for i in range(20):
                tasks.start_soon(call, i)
    assert results == {i: [float(i), 2.0] for i in range(20)}


class Held(mds.ModelHandler[int, int]):
    """infer waits until the test opens the gate; records what it computed."""

    def __init__(self) -> None:
        self.computed: list[int] = []
        self.started = anyio.Event()
        self.gate = anyio.Event()

    async def infer(self, batch: Sequence[int]) -> list[int]:
        self.computed.extend(batch)
        self.started.set()
        await self.gate.wait()
        return list(batch)


async def test_a_deadline_answers_in_time_and_an_expired_queued_item_is_never_computed() -> None:
    handler = Held()
    async with mds.ModelRuntime(handler) as model:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(model.serve, 1)  # occupies the only instance
            await handler.started.wait()
            with pytest.raises(mds.DeadlineExceeded, match="passed while it waited in the queue"):
                await model.serve(2, timeout=0.05)
            handler.gate.set()
        assert await model.serve(3, timeout=5) == 3
        stats = model.statistics()
    assert handler.computed == [1, 3]
    assert stats.errors == {"DeadlineExceeded": 1}


async def test_a_deadline_is_kept_while_preprocess_waits_for_a_thread() -> None:
    started, gate = threading.Event(), threading.Event()

    class Decoding(mds.ModelHandler[int, int]):
        def preprocess(self, request: int) -> int:  # a plain method: in a thread
            if request == 0:
                started.set()
                gate.wait(10)
            return request

        async def infer(self, batch: Sequence[int]) -> list[int]:
            return list(batch)

    config = mds.ModelConfig(worker_threads=1)
    async with mds.ModelRuntime(Decoding(), config) as model, anyio.create_task_group() as tasks:
        tasks.start_soon(model.serve, 0)  # holds the only thread
        assert await anyio.to_thread.run_sync(started.wait, 10)
        with pytest.raises(mds.DeadlineExceeded, match="deadline passed in preprocess"):
            await model.serve(1, timeout=0.05)
        assert not gate.is_set()  # answered while the thread was still busy
        gate.set()
    assert model.statistics().completed == 1


@pytest.mark.virtual_time  # the deadline must pass while the batch computes, not before
async def test_the_models_default_timeout_applies() -> None:
    async with mds.ModelRuntime(Held(), mds.ModelConfig(timeout=0.05)) as model:
        with pytest.raises(mds.DeadlineExceeded, match="passed while its batch was computed"):
            await model.serve(1)


async def test_a_cancelled_caller_takes_its_item_out_of_the_queue() -> None:
    handler = Held()
    async with mds.ModelRuntime(handler) as model:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(model.serve, 1)
            await handler.started.wait()
            with anyio.move_on_after(0.05):
                await model.serve(2)  # the client goes away while it is queued
            assert model.statistics().queued == 0
            handler.gate.set()
        stats = model.statistics()
    assert handler.computed == [1]
    assert stats.cancelled == 1 and stats.completed == 1


async def test_a_full_queue_rejects_at_once() -> None:
    handler = Held()
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_queue_size=2))
    async with mds.ModelRuntime(handler, config) as model:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(model.serve, 0)
            await handler.started.wait()
            tasks.start_soon(model.serve, 1)
            tasks.start_soon(model.serve, 2)
            await anyio.wait_all_tasks_blocked()
            assert model.statistics().queued == 2
            with pytest.raises(mds.Overloaded, match="queue is full \\(2 requests waiting\\)"):
                await model.serve(3)
            handler.gate.set()
        stats = model.statistics()
    assert sorted(handler.computed) == [0, 1, 2]
    assert (stats.completed, stats.rejected, stats.errors) == (3, 1, {"Overloaded": 1})


async def test_shutdown_answers_every_request_in_flight() -> None:
    gate = anyio.Event()

    class Held(mds.ModelHandler[int, int]):
        async def infer(self, batch: Sequence[int]) -> list[int]:
            await gate.wait()
            return [x * 10 for x in batch]

    runtime = mds.Runtime()
    model = runtime.add_model(
        "held", Held, mds.ModelConfig(instances=2, batching=mds.BatchingConfig(max_batch_size=4))
    )
    answers: dict[int, Any] = {}

    async def call(i: int) -> None:
        try:
            answers[i] = await runtime.serve("held", i)
        except mds.MdsError as exc:
            answers[i] = exc

    async with anyio.create_task_group() as tasks:
        async with runtime:
            for i in range(50):
                tasks.start_soon(call, i)
            await anyio.wait_all_tasks_blocked()
            assert model.statistics().in_flight == 50
            # Leaving the block drains: a late request is refused, then the
            # gate opens and every admitted request is computed.
            tasks.start_soon(_open_when_draining, model, gate, call)
    assert str(answers.pop(-1)) == "model 'held' (version 1): not ready: it is draining"
    assert answers == {i: i * 10 for i in range(50)}
    assert model.state is mds.ModelState.STOPPED


async def _open_when_draining(
    model: mds.ModelRuntime[int, int], gate: anyio.Event, call: Any
) -> None:
    # No event marks the start of a drain; poll the state.
    await eventually(lambda: model.state is mds.ModelState.DRAINING, "draining")
    await call(-1)
    gate.set()


async def test_a_drain_that_times_out_still_answers_everyone() -> None:
    handler = Held()  # never opened: the drain must give up
    config = mds.ModelConfig(drain_timeout=0.05, batching=mds.BatchingConfig(max_batch_size=2))
    answers: list[Any] = []

    async def call(model: mds.ModelRuntime[int, int], i: int) -> None:
        try:
            answers.append(await model.serve(i))
        except mds.MdsError as exc:
            answers.append(exc)

    async with anyio.create_task_group() as tasks:
        async with mds.ModelRuntime(handler, config) as model:
            for i in range(5):
                tasks.start_soon(call, model, i)
            await handler.started.wait()
    assert len(answers) == 5
    assert all(isinstance(a, mds.Unavailable) for a in answers)
    messages = sorted({str(a) for a in answers})
    assert messages == [
        "model 'Held' (version 1): the model stopped before this request was computed",
        "model 'Held' (version 1): the model stopped while computing this request",
    ]
    assert 1 <= len(handler.computed) <= 2  # one batch ran; trio may form it early


@settings(max_examples=30, deadline=None)
@given(
    plan=st.lists(
        st.tuples(
            st.sampled_from([None, "preprocess", "infer", "postprocess"]),
            st.booleans(),  # the caller gives up early
        ),
        min_size=1,
        max_size=40,
    ),
    max_batch_size=st.integers(1, 8),
    instances=st.integers(1, 3),
)
async def test_every_caller_gets_exactly_its_own_answer(
    plan: list[tuple[str | None, bool]], max_batch_size: int, instances: int, answers: Any
) -> None:
    runtime = mds.Runtime()
    runtime.add_model(
        "picky",
        Picky,
        mds.ModelConfig(
            instances=instances, batching=mds.BatchingConfig(max_batch_size=max_batch_size)
        ),
    )
    outcomes: dict[int, list[Any]] = {}

    async def call(i: int, fail: str | None, give_up: bool) -> None:
        outcomes[i] = await answers(
            lambda: runtime.serve("picky", {"x": i, "fail": fail}), give_up=0 if give_up else None
        )

    async with runtime:
        async with anyio.create_task_group() as tasks:
            for i, (fail, give_up) in enumerate(plan):
                tasks.start_soon(call, i, fail, give_up)
        assert runtime.statistics()["picky"].in_flight == 0
    for i, (fail, give_up) in enumerate(plan):
        [answer] = outcomes[i]
        if give_up and answer == "gave up":
            continue  # a caller that gave up may still get its answer if it came first
        if fail is None:
            assert answer == 2.0 * i
        else:
            assert isinstance(answer, mds.MdsError)
