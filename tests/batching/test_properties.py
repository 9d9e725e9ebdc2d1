"""Under any arrivals, cancellations, deadlines and failures: one answer each, its own."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import anyio
from hypothesis import given, settings
from hypothesis import strategies as st

import mds


class Doubling(mds.ModelHandler[int, int]):
    """Doubles; a batch holding a poison item raises; a bad item fails alone."""

    def __init__(self, poison: frozenset[int], bad: frozenset[int], seconds: float) -> None:
        self.poison, self.bad, self.seconds = poison, bad, seconds

    async def infer(self, batch: Sequence[int]) -> list[Any]:
        await anyio.sleep(self.seconds)
        if self.poison & set(batch):
            raise RuntimeError("poisoned batch")
        return [mds.InvalidInput("bad item") if x in self.bad else 2 * x for x in batch]


request = st.fixed_dictionaries(
    {
        "gap": st.sampled_from([0.0, 0.0, 0.0005, 0.002]),
        "kind": st.sampled_from(["ok", "ok", "ok", "poison", "bad"]),
        "timeout": st.sampled_from([None, None, 0.001, 0.05]),
        "give_up": st.sampled_from([None, None, 0.0, 0.001]),
        "priority": st.integers(0, 1),
    }
)


@settings(max_examples=40, deadline=None)
@given(
    plan=st.lists(request, min_size=1, max_size=30),
    max_batch_size=st.integers(1, 6),
    instances=st.integers(1, 3),
    delay=st.sampled_from([0.0, 0.001]),
    wait_when_idle=st.booleans(),
    delay_from=st.sampled_from(["oldest", "start"]),
    infer_seconds=st.sampled_from([0.0, 0.0005]),
)
async def test_every_request_gets_exactly_one_answer_and_its_own(
    plan: list[dict[str, Any]],
    max_batch_size: int,
    instances: int,
    delay: float,
    wait_when_idle: bool,
    delay_from: Literal["oldest", "start"],
    infer_seconds: float,
    answers: Any,
) -> None:
    poison = frozenset(i for i, r in enumerate(plan) if r["kind"] == "poison")
    bad = frozenset(i for i, r in enumerate(plan) if r["kind"] == "bad")
    config = mds.ModelConfig(
        instances=instances,
        batching=mds.BatchingConfig(
            max_batch_size=max_batch_size,
            max_queue_delay=delay,
            wait_when_idle=wait_when_idle,
            delay_from=delay_from,
            priority_levels=2,
            preferred_batch_sizes=(max_batch_size,),
        ),
    )
    model = mds.ModelRuntime(lambda: Doubling(poison, bad, infer_seconds), config)
    outcomes: dict[int, list[Any]] = {}

    async def call(i: int, r: dict[str, Any]) -> None:
        outcomes[i] = await answers(
            lambda: model.serve(i, timeout=r["timeout"], priority=r["priority"]),
            give_up=r["give_up"],
        )

    async with model:
        async with anyio.create_task_group() as tasks:
            for i, r in enumerate(plan):
                tasks.start_soon(call, i, r)
                if r["gap"]:
                    await anyio.sleep(r["gap"])
        stats = model.statistics()
        assert (stats.in_flight, stats.queued) == (0, 0)
        assert await model.serve(1000) == 2000  # still serving

    for i, r in enumerate(plan):
        assert len(outcomes[i]) == 1, (i, outcomes[i])
        [answer] = outcomes[i]
        if answer == "gave up" or isinstance(answer, mds.DeadlineExceeded):
            continue  # allowed for callers that set a limit
        if r["kind"] == "ok":
            assert answer == 2 * i
        elif r["kind"] == "bad":
            assert isinstance(answer, mds.InvalidInput)
        else:
            assert isinstance(answer, mds.InferenceError)
            assert "poisoned batch" in str(answer)


async def test_thousands_of_callers_with_cancellations_and_failures(answers: Any) -> None:
    """Stress: 3,000 callers, a third give up early, some batches fail."""
    rng = random.Random(7)
    poison = frozenset(rng.sample(range(3000), 40))
    config = mds.ModelConfig(
        instances=2,
        batching=mds.BatchingConfig(max_batch_size=32, max_queue_size=4000),
    )
    model = mds.ModelRuntime(lambda: Doubling(poison, frozenset(), 0.0001), config)
    outcomes: dict[int, list[Any]] = {}

    async def call(i: int, give_up: float | None) -> None:
        outcomes[i] = await answers(lambda: model.serve(i), give_up=give_up)

    async with model:
        async with anyio.create_task_group() as tasks:
            for i in range(3000):
                tasks.start_soon(call, i, rng.choice([None, None, 0.0, 0.002]))
        stats = model.statistics()
        assert await model.serve(5) == 10
    assert all(len(answer) == 1 for answer in outcomes.values())
    for i, [answer] in outcomes.items():
        if answer == "gave up":
            continue
        if i in poison:
            assert isinstance(answer, mds.InferenceError)
        else:
            assert answer == 2 * i
    assert stats.completed + stats.failed + stats.cancelled == 3000
    assert stats.failed == sum(1 for i in poison if outcomes[i] != ["gave up"])
