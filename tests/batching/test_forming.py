"""How the batcher forms batches: delay, preferred sizes, cost, priorities, buckets."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import numpy as np
import pytest

import mds


def model_of(handler: Any, **batching: Any) -> mds.ModelRuntime[Any, Any]:
    config: dict[str, Any] = {}
    for key in ("instances", "timeout"):
        if key in batching:
            config[key] = batching.pop(key)
    return mds.ModelRuntime(
        handler, mds.ModelConfig(batching=mds.BatchingConfig(**batching), **config)
    )


@pytest.mark.virtual_time
async def test_an_idle_model_takes_a_lone_request_at_once(recorder: Any) -> None:
    async with model_of(recorder, max_batch_size=8, max_queue_delay=5.0) as model:
        began = anyio.current_time()
        assert await model.serve(1) == 1
        assert anyio.current_time() - began < 1.0  # the 5 s delay was not waited
    assert recorder.sizes == [1]


@pytest.mark.virtual_time
async def test_wait_when_idle_makes_an_idle_model_wait_for_company(recorder: Any) -> None:
    model = model_of(recorder, max_batch_size=4, max_queue_delay=1.0, wait_when_idle=True)
    async with model, anyio.create_task_group() as tasks:
        began = anyio.current_time()
        tasks.start_soon(model.serve, 1)
        await anyio.sleep(0.5)
        assert recorder.sizes == []  # the lone request waits
        for i in range(2, 5):
            tasks.start_soon(model.serve, i)  # the batch fills up: it goes at once
        await anyio.wait_all_tasks_blocked()
        assert recorder.sizes == [4]
        assert anyio.current_time() - began < 1.0
        tasks.start_soon(model.serve, 5)  # alone for good: goes when the delay ends
    assert recorder.sizes == [4, 1]
    assert anyio.current_time() - began >= 1.5


@pytest.mark.virtual_time
@pytest.mark.parametrize(("delay_from", "sizes"), [("oldest", [1, 1, 1]), ("start", [1, 2])])
async def test_the_delay_counts_from_the_oldest_arrival_or_from_the_batchs_start(
    recorder: Any, delay_from: str, sizes: list[int]
) -> None:
    model = model_of(recorder, max_batch_size=4, max_queue_delay=1.0, delay_from=delay_from)
    async with model, anyio.create_task_group() as tasks:
        began = anyio.current_time()
        await recorder.busy(tasks, model, "first")  # computes for 5 s
        tasks.start_soon(model.serve, "queued")  # waits behind it
        await anyio.sleep(5.0)
        recorder.release()
        await anyio.sleep(0.5)
        # "oldest": "queued" has waited 5 s, past its 1 s, and went at 5 s.
        # "start": the batch started at 5 s, so it waits until 6 s for company.
        tasks.start_soon(model.serve, "later")
    assert recorder.sizes == sizes
    if delay_from == "start":
        assert anyio.current_time() - began >= 6.0


@pytest.mark.virtual_time
async def test_a_batch_started_anew_counts_its_delay_anew(recorder: Any) -> None:
    # A first request that leaves while its batch waits takes its start time along.
    model = model_of(
        recorder, max_batch_size=4, max_queue_delay=1.0, wait_when_idle=True, delay_from="start"
    )
    async with model, anyio.create_task_group() as tasks:
        with anyio.move_on_after(0.5):
            await model.serve("leaves")
        await anyio.sleep(10.0)
        began = anyio.current_time()
        tasks.start_soon(model.serve, "lone")
        await anyio.sleep(0.5)
        tasks.start_soon(model.serve, "company")
    assert recorder.batches == [["lone", "company"]]
    assert anyio.current_time() - began >= 1.0


@pytest.mark.virtual_time
async def test_a_batch_waiting_to_grow_goes_once_its_delay_is_lowered(recorder: Any) -> None:
    model = model_of(recorder, max_batch_size=4, max_queue_delay=30.0, wait_when_idle=True)
    async with model, anyio.create_task_group() as tasks:
        began = anyio.current_time()
        tasks.start_soon(model.serve, 1)
        await anyio.wait_all_tasks_blocked()
        assert recorder.sizes == []  # waiting out the 30 s
        model.set_batching(mds.BatchingConfig(max_batch_size=4))
        await anyio.wait_all_tasks_blocked()
        assert recorder.sizes == [1]
        assert anyio.current_time() - began < 1.0


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # trio's test clock would skip the guard
async def test_set_batching_from_another_thread_wakes_a_waiting_batch(recorder: Any) -> None:
    model = model_of(recorder, max_batch_size=4, max_queue_delay=60.0, wait_when_idle=True)
    async with model:
        answers: list[Any] = []

        async def call() -> None:
            answers.append(await model.serve(7))

        with anyio.fail_after(30):  # a hang guard: the old delay was 60 s
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(call)
                await anyio.wait_all_tasks_blocked()
                assert model.statistics().queued == 1
                lower = mds.BatchingConfig(max_batch_size=4, max_queue_delay=0.001)
                await anyio.to_thread.run_sync(model.set_batching, lower)
        assert answers == [7]
        assert model.config.batching.max_queue_delay == 0.001


@pytest.mark.virtual_time
async def test_wait_when_idle_never_costs_a_lone_request_its_deadline(recorder: Any) -> None:
    model = model_of(recorder, max_batch_size=4, max_queue_delay=1.0, wait_when_idle=True)
    async with model:
        began = anyio.current_time()
        # No batch timed yet: a request with a deadline goes at once.
        assert await model.serve(1, timeout=0.2) == 1
        assert anyio.current_time() - began < 0.2
    assert recorder.sizes == [1]


async def test_under_load_batches_grow_up_to_the_limit(recorder: Any) -> None:
    async with model_of(recorder, max_batch_size=4) as model, anyio.create_task_group() as tasks:
        await recorder.busy(tasks, model)
        for i in range(1, 10):
            tasks.start_soon(model.serve, i)
        await anyio.wait_all_tasks_blocked()
        recorder.release()
    assert recorder.sizes == [1, 4, 4, 1]
    assert sorted(x for batch in recorder.batches for x in batch) == list(range(10))


@pytest.mark.virtual_time
async def test_while_busy_a_batch_waits_up_to_the_delay_to_grow(recorder: Any) -> None:
    model = model_of(recorder, max_batch_size=4, max_queue_delay=1.0)
    async with model, anyio.create_task_group() as tasks:
        await recorder.busy(tasks, model)
        tasks.start_soon(model.serve, 1)  # queued while busy: a backlog
        await anyio.wait_all_tasks_blocked()
        recorder.release()  # batch [0] ends; [1] waits for company, up to 1 s
        began = anyio.current_time()
        await anyio.wait_all_tasks_blocked()
        assert recorder.sizes == [1]
        for i in range(2, 5):
            tasks.start_soon(model.serve, i)  # the batch fills up: it goes at once
    assert recorder.sizes == [1, 4]
    assert anyio.current_time() - began < 1.0


@pytest.mark.virtual_time
async def test_a_waiting_batch_goes_when_the_delay_ends(recorder: Any) -> None:
    async with model_of(recorder, max_batch_size=4, max_queue_delay=0.05) as model:
        async with anyio.create_task_group() as tasks:
            await recorder.busy(tasks, model)
            tasks.start_soon(model.serve, 1)
            await anyio.wait_all_tasks_blocked()
            recorder.release()
            began = anyio.current_time()
        waited = anyio.current_time() - began
    assert recorder.sizes == [1, 1]
    assert waited >= 0.04


@pytest.mark.virtual_time
async def test_a_growing_batch_never_waits_past_its_tightest_deadline(recorder: Any) -> None:
    async with model_of(recorder, max_batch_size=4, max_queue_delay=10.0) as model:
        async with anyio.create_task_group() as tasks:
            await recorder.busy(tasks, model)
            result: list[int] = []

            async def tight() -> None:
                result.append(await model.serve(1, timeout=0.2))

            tasks.start_soon(tight)
            await anyio.wait_all_tasks_blocked()
            recorder.release()
            began = anyio.current_time()
        assert result == [1]  # computed in time, not DeadlineExceeded
        assert anyio.current_time() - began < 0.2


async def test_the_largest_preferred_size_that_fits_goes_first(recorder: Any) -> None:
    model = model_of(recorder, max_batch_size=16, preferred_batch_sizes=(4, 8))
    async with model, anyio.create_task_group() as tasks:
        await recorder.busy(tasks, model)
        for i in range(1, 12):
            tasks.start_soon(model.serve, i)
        await anyio.wait_all_tasks_blocked()
        recorder.release()
    assert recorder.sizes == [1, 8, 3]


class Tokens(mds.ModelHandler[list[int], int]):
    """Items cost their length; records the cost of each batch."""

    def __init__(self) -> None:
        self.costs: list[int] = []
        self.gate = anyio.Event()

    def cost(self, item: list[int]) -> int:
        if item == [13]:
            raise ValueError("unlucky")
        return len(item)

    async def infer(self, batch: Sequence[list[int]]) -> list[int]:
        self.costs.append(sum(len(item) for item in batch))
        await self.gate.wait()
        return [sum(item) for item in batch]


async def test_batch_size_counts_cost_not_requests() -> None:
    handler = Tokens()
    async with model_of(handler, max_batch_size=10) as model:
        async with anyio.create_task_group() as tasks:
            for n in [3, 4, 5, 2, 6, 1, 9]:
                tasks.start_soon(model.serve, list(range(n)))
            await anyio.wait_all_tasks_blocked()
            handler.gate.set()
        assert all(cost <= 10 for cost in handler.costs)
        assert sum(handler.costs) == 30
        with pytest.raises(mds.InvalidInput, match="cost is 11; it must be a whole number"):
            await model.serve(list(range(11)))
        with pytest.raises(mds.InvalidInput, match=r"could not size the request.*unlucky"):
            await model.serve([13])
        assert await model.serve([2, 3]) == 5  # and the batcher serves on
        stats = model.statistics()
    assert stats.batched_cost == 32 and stats.errors == {"InvalidInput": 2}


async def test_higher_priorities_go_first_and_each_level_has_its_own_limit(
    recorder: Any,
) -> None:
    model = model_of(recorder, max_batch_size=2, priority_levels=2, priority_queue_sizes=(4, 2))
    async with model, anyio.create_task_group() as tasks:
        await recorder.busy(tasks, model, "first")
        for name in ["low-a", "low-b"]:
            tasks.start_soon(lambda n=name: model.serve(n, priority=1))
        await anyio.wait_all_tasks_blocked()
        for name in ["high-a", "high-b"]:
            tasks.start_soon(lambda n=name: model.serve(n, priority=0))
        await anyio.wait_all_tasks_blocked()
        assert model.statistics().queued_by_priority == (2, 2)
        with pytest.raises(mds.Overloaded, match=r"2 requests waiting at priority 1"):
            await model.serve("low-c", priority=1)
        with pytest.raises(mds.InvalidInput, match="priority 2 is not a level"):
            await model.serve("x", priority=2)
        recorder.release()
    assert [sorted(batch) for batch in recorder.batches] == [
        ["first"],
        ["high-a", "high-b"],
        ["low-a", "low-b"],
    ]


async def test_settings_change_while_the_model_runs(recorder: Any) -> None:
    async with model_of(recorder, max_batch_size=2) as model:
        async with anyio.create_task_group() as tasks:
            await recorder.busy(tasks, model)
            for i in range(1, 7):
                tasks.start_soon(model.serve, i)
            await anyio.wait_all_tasks_blocked()
            model.set_batching(mds.BatchingConfig(max_batch_size=8))
            recorder.release()
        assert recorder.sizes == [1, 6]
        assert model.config.batching.max_batch_size == 8
        with pytest.raises(mds.ConfigError, match="priority_levels cannot change"):
            model.set_batching(mds.BatchingConfig(max_batch_size=8, priority_levels=3))
        assert model.config.batching.priority_levels == 1
    warm = mds.ModelRuntime(
        recorder,
        mds.ModelConfig(warmup_batch_sizes=(1, 4), batching=mds.BatchingConfig(max_batch_size=4)),
    )
    with pytest.raises(mds.ConfigError, match="warmup_batch_sizes: 4 is larger"):
        warm.set_batching(mds.BatchingConfig(max_batch_size=2))


class Lengths(mds.ModelHandler[list[int], int]):
    """Pads token lists, bucketed by length; records each batch's lengths."""

    collator = mds.Pad(buckets=(4, 8))

    def __init__(self) -> None:
        self.seen: list[list[int]] = []
        self.gate = anyio.Event()

    async def infer(self, batch: mds.Padded) -> np.ndarray:
        self.seen.append(list(batch.lengths))
        await self.gate.wait()
        return np.asarray(batch.values).sum(axis=1)


async def test_buckets_keep_short_and_long_inputs_apart() -> None:
    handler = Lengths()
    lengths = [1, 9, 3, 6, 2, 12, 4, 8, 5]
    results: dict[int, int] = {}
    async with model_of(handler, max_batch_size=16) as model:

        async def call(n: int) -> None:
            results[n] = await model.serve(list(range(n)))

        async with anyio.create_task_group() as tasks:
            for n in lengths:
                tasks.start_soon(call, n)
            await anyio.wait_all_tasks_blocked()
            handler.gate.set()
        stats = model.statistics()
    assert results == {n: sum(range(n)) for n in lengths}
    buckets = [{0 if n <= 4 else 1 if n <= 8 else 2 for n in seen} for seen in handler.seen]
    assert all(len(b) == 1 for b in buckets), handler.seen
    assert 0 < stats.padding_ratio < 1


async def test_statistics_and_a_trace_describe_the_batches(recorder: Any) -> None:
    async with model_of(recorder, max_batch_size=4, timeout=30) as model:
        async with anyio.create_task_group() as tasks:
            await recorder.busy(tasks, model)
            traced: list[mds.Traced[Any]] = []

            async def call(i: int) -> None:
                traced.append(await model.serve(i, trace=True))

            for i in range(1, 4):
                tasks.start_soon(call, i)
            await anyio.wait_all_tasks_blocked()
            await anyio.sleep(0.1)
            recorder.release()
        stats = model.statistics()
    assert stats.batch_sizes == {1: 1, 3: 1}
    assert stats.queue_wait_p99 >= 0.1 and stats.mean_queue_wait > 0
    assert stats.queued == 0 and stats.deadline_misses == 0
    for result in traced:
        assert result.value in (1, 2, 3)
        trace = result.trace
        assert (trace.model, trace.instance, trace.batch_size, trace.batch_cost) == (
            "Recorder",
            0,
            3,
            3,
        )
        assert trace.queue_wait >= 0.1
        assert trace.total_seconds >= trace.queue_wait + trace.infer_seconds
        assert trace.padding_ratio == 0.0


async def test_several_instances_run_several_batches_at_once() -> None:
    gate = anyio.Event()
    running: list[int] = []
    most = 0

    class Slow(mds.ModelHandler[int, int]):
        def init(self, context: mds.ModelContext) -> None:
            self.index = context.instance

        async def infer(self, batch: Sequence[int]) -> list[int]:
            nonlocal most
            running.append(self.index)
            most = max(most, len(running))
            await gate.wait()
            running.remove(self.index)
            return list(batch)

    config = mds.ModelConfig(instances=3, batching=mds.BatchingConfig(max_batch_size=2))
    async with mds.ModelRuntime(Slow, config) as model, anyio.create_task_group() as tasks:
        for i in range(12):
            tasks.start_soon(model.serve, i)
        await anyio.wait_all_tasks_blocked()
        assert sorted(running) == [0, 1, 2]
        assert model.statistics().queued >= 6  # 3 batches (of up to 2) running, the rest waits
        gate.set()
    assert most == 3


class Blocking(mds.ModelHandler[int, int]):
    """A plain (thread) infer whose first batch blocks until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.started = threading.Event()
        self.gate = threading.Event()

    def infer(self, batch: Sequence[int]) -> list[int]:
        self.batches.append(list(batch))
        if len(self.batches) == 1:
            self.started.set()
            self.gate.wait(10)
        return [x * 10 for x in batch]


async def busy_with_first(model: mds.ModelRuntime[int, int], handler: Blocking, tasks: Any) -> None:
    tasks.start_soon(model.serve, 0)
    await anyio.to_thread.run_sync(handler.started.wait, 10)


async def test_a_full_batch_is_handed_over_while_the_instance_computes() -> None:
    handler = Blocking()
    async with model_of(handler, max_batch_size=4) as model:
        async with anyio.create_task_group() as tasks:
            await busy_with_first(model, handler, tasks)
            for i in range(1, 8):
                tasks.start_soon(model.serve, i)
            await anyio.wait_all_tasks_blocked()
            # 1-4 make a full batch: handed to the instance, queued behind [0].
            # 5-7 could still grow, so they wait for the instance to be free.
            assert model.statistics().queued == 3
            handler.gate.set()
        stats = model.statistics()
    assert [len(batch) for batch in handler.batches] == [1, 4, 3]  # tasks start in any order
    assert sorted(x for batch in handler.batches for x in batch) == list(range(8))
    assert stats.completed == 8


async def test_a_batch_that_is_not_full_waits_for_the_instance() -> None:
    handler = Blocking()
    async with model_of(handler, max_batch_size=4) as model:
        async with anyio.create_task_group() as tasks:
            await busy_with_first(model, handler, tasks)
            for i in range(1, 4):
                tasks.start_soon(model.serve, i)
            await anyio.wait_all_tasks_blocked()
            assert model.statistics().queued == 3
            tasks.start_soon(model.serve, 4)  # now full: handed over
            await anyio.wait_all_tasks_blocked()
            assert model.statistics().queued == 0
            handler.gate.set()
    assert [sorted(batch) for batch in handler.batches] == [[0], [1, 2, 3, 4]]


async def test_callers_of_a_handed_over_batch_can_leave(
    answers: Callable[..., Awaitable[list[Any]]],
) -> None:
    handler = Blocking()
    async with model_of(handler, max_batch_size=2) as model:
        async with anyio.create_task_group() as tasks:
            await busy_with_first(model, handler, tasks)
            results: dict[int, list[Any]] = {}
            leave = anyio.CancelScope()

            async def call(x: int) -> None:
                results[x] = ["gave up"]
                with leave if x == 1 else anyio.CancelScope():
                    results[x] = await answers(lambda: model.serve(x))

            for x in (1, 2, 3):
                tasks.start_soon(call, x)
            await anyio.wait_all_tasks_blocked()
            leave.cancel()  # 1 gives up while its batch is handed over
            await anyio.wait_all_tasks_blocked()
            assert model.statistics().cancelled == 1
            handler.gate.set()
        stats = model.statistics()
    assert results == {1: ["gave up"], 2: [20], 3: [30]}
    assert stats.cancelled == 1
    assert model.state is mds.ModelState.STOPPED
    assert 1 not in {x for batch in handler.batches for x in batch}  # never computed


async def test_a_handed_over_batch_leaves_out_items_whose_deadline_passed() -> None:
    handler = Blocking()
    async with model_of(handler, max_batch_size=2) as model:
        async with anyio.create_task_group() as tasks:
            await busy_with_first(model, handler, tasks)
            answered = anyio.Event()
            expired: list[BaseException] = []

            async def call_with_deadline() -> None:
                try:
                    await model.serve(1, timeout=0.05)
                except mds.DeadlineExceeded as exc:
                    expired.append(exc)
                answered.set()

            tasks.start_soon(call_with_deadline)
            tasks.start_soon(model.serve, 2)
            await anyio.wait_all_tasks_blocked()
            assert model.statistics().queued == 0  # [1, 2] is full: handed over
            with anyio.fail_after(10):
                await answered.wait()  # at its deadline, while the batch waited
            handler.gate.set()
    assert "while its batch was computed" in str(expired[0])
    assert handler.batches == [[0], [2]]  # its batch started without it


async def test_an_async_infer_never_gets_two_batches_at_once() -> None:
    gate = anyio.Event()
    running = most = 0

    class Async(mds.ModelHandler[int, int]):
        async def infer(self, batch: Sequence[int]) -> list[int]:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await gate.wait()
            running -= 1
            return list(batch)

    async with model_of(Async(), max_batch_size=2) as model, anyio.create_task_group() as tasks:
        for i in range(12):
            tasks.start_soon(model.serve, i)
        await anyio.wait_all_tasks_blocked()
        # One batch running: of 2, or of 1 when the first request found the
        # model idle and went alone (task start order differs under trio).
        assert model.statistics().queued in (10, 11)
        gate.set()
    assert most == 1


async def test_lowering_the_limit_below_a_queued_cost_fails_that_request_alone() -> None:
    handler = Tokens()
    async with model_of(handler, max_batch_size=10) as model:
        answers: dict[int, Any] = {}

        async def call(n: int) -> None:
            try:
                answers[n] = await model.serve(list(range(n)))
            except mds.MdsError as exc:
                answers[n] = exc

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(call, 1)  # computing (held) while the others queue
            await anyio.wait_all_tasks_blocked()
            for n in (2, 8, 3):
                tasks.start_soon(call, n)
                await anyio.wait_all_tasks_blocked()
            model.set_batching(mds.BatchingConfig(max_batch_size=5))
            handler.gate.set()
    assert answers[1] == 0 and answers[2] == 1 and answers[3] == 3
    assert isinstance(answers[8], mds.InvalidInput)
    assert "cost 8 is more than the batch limit (5), lowered after it was queued" in str(answers[8])


def test_requests_that_left_a_stalled_queue_do_not_pile_up() -> None:
    """Unit: cancelled items deep in a lane are compacted away (no public handle)."""
    from mds._batching.queue import Item, RequestQueue

    queue = RequestQueue(1)
    kept = Item("kept", None, 0.0, 0)  # type: ignore[arg-type]
    queue.put(kept)
    for seq in range(1, 5000):
        item = Item(seq, None, 0.0, seq)  # type: ignore[arg-type]
        queue.put(item)
        queue.forget(item)  # its caller went away
        item.state = 2
    assert queue.count == 1
    assert len(queue.first) < 300
    assert queue.first[0] is kept
