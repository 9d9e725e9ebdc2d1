"""serve_many: each request's own outcome, in order, as serve would give it; nothing lost."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mds


class Doubling(mds.ModelHandler[int, int]):
    """No preprocess (the fast path); a postprocess on the loop that fails for 7."""

    def __init__(self) -> None:
        self.computed: list[int] = []

    async def infer(self, batch: Sequence[int]) -> list[int]:
        self.computed += batch
        await anyio.sleep(0.001)
        return [2 * x for x in batch]

    async def postprocess(self, output: int) -> int:
        if output == 14:
            raise ValueError("seven")
        return output


CONFIG = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=4, max_queue_size=64))


def expected(x: int) -> int | type[mds.MdsError]:
    return mds.InferenceError if x == 7 else 2 * x


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=9), max_size=40))
def test_each_outcome_is_what_serve_gives_in_order(xs: list[int]) -> None:
    async def main() -> None:
        async with mds.ModelRuntime(Doubling(), CONFIG, name="d") as model:
            outcomes = await model.serve_many(xs)
            got = [type(o) if isinstance(o, mds.MdsError) else o for o in outcomes]
            assert got == [expected(x) for x in xs]
            stats = model.statistics()
            assert stats.in_flight == 0 and stats.completed == sum(x != 7 for x in xs)

    anyio.run(main)


async def test_a_full_queue_answers_the_overflow_overloaded() -> None:
    small = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=2, max_queue_size=3))
    async with mds.ModelRuntime(Doubling(), small, name="d") as model:
        outcomes = await model.serve_many(list(range(10)))
    overloaded = [o for o in outcomes if isinstance(o, mds.Overloaded)]
    assert overloaded and all("queue is full" in str(o) for o in overloaded)
    assert all(o == 2 * i for i, o in enumerate(outcomes) if not isinstance(o, mds.MdsError))
    assert model.statistics().in_flight == 0


async def test_a_cancelled_call_leaves_nothing_queued_and_the_model_drains() -> None:
    handler = Doubling()
    slow = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=1, max_queue_size=64))
    async with mds.ModelRuntime(handler, slow, name="d") as model:
        with anyio.move_on_after(0.002):
            await model.serve_many(list(range(50)))
        assert model.statistics().in_flight == 0
        assert len(handler.computed) < 50  # the abandoned ones were never computed
        assert await model.serve(3) == 6


async def test_a_model_not_running_answers_each_request_not_ready() -> None:
    model = mds.ModelRuntime(Doubling(), CONFIG, name="d")
    outcomes = await model.serve_many([1, 2])
    assert [type(o) for o in outcomes] == [mds.NotReady, mds.NotReady]


@pytest.mark.parametrize("request_count", [0, 1])
async def test_empty_and_single(request_count: int) -> None:
    async with mds.ModelRuntime(Doubling(), CONFIG, name="d") as model:
        assert await model.serve_many([5] * request_count) == [10] * request_count


class Poisoned(mds.ModelHandler[int, int]):
    """A batch with a negative number in it fails as a whole (as a real model's would)."""

    def infer(self, batch: Sequence[int]) -> list[int]:
        if any(x < 0 for x in batch):
            raise ValueError("a negative number poisoned the batch")
        return [x + 1 for x in batch]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=-2, max_value=9), min_size=2, max_size=60))
def test_rows_fail_alone_when_their_batch_fails(xs: list[int]) -> None:
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=8))

    async def main() -> None:
        async with mds.ModelRuntime(Poisoned, config, name="p") as model:
            outcomes = await model.serve_many(xs)
            stats = model.statistics()
        for x, outcome in zip(xs, outcomes, strict=True):
            if x < 0:
                assert isinstance(outcome, mds.InferenceError)
                assert "poisoned" in str(outcome)
            else:
                assert outcome == x + 1
        assert stats.in_flight == 0
        assert (stats.completed, stats.failed) == (sum(x >= 0 for x in xs), sum(x < 0 for x in xs))
        # Batches are counted in rows (a failed batch's halves retried count again).
        assert stats.histograms.batch_size.sum == stats.batched_items >= len(xs)

    anyio.run(main)


async def test_a_batch_jobs_rows_and_single_requests_share_batches() -> None:
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=16, max_queue_delay=0.01))
    async with mds.ModelRuntime(Poisoned, config, name="p") as model:
        singles: list[int] = []

        async def one(x: int) -> None:
            singles.append(await model.serve(x))

        async with anyio.create_task_group() as tasks:
            for x in range(5):
                tasks.start_soon(one, 100 + x)
            rows = await model.serve_many(list(range(20)))
        assert rows == [x + 1 for x in range(20)]
        assert sorted(singles) == [101 + x for x in range(5)]
        stats = model.statistics()
    assert stats.batched_items == 25 and max(stats.batch_sizes) <= 16
