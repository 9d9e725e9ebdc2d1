"""Stateful models: sequences share state, keep their order, batch together, always end."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mds

from ..waiting import eventually


class RunningSum(mds.ModelHandler[float, float]):
    """Each step adds its input to the sequence's sum; a negative input fails its step."""

    def __init__(self, *, fail_start: frozenset[Any] = frozenset()) -> None:
        self.fail_start = fail_start
        self.batches: list[list[Any]] = []
        self.seen: list[tuple[Any, float]] = []  # (sequence, input), in the order computed
        self.starts: list[Any] = []
        self.ends: list[tuple[Any, Any, mds.SequenceEnd]] = []
        self.instance = -1

    def init(self, context: mds.ModelContext) -> None:
        self.instance = context.instance

    def sequence_start(self, sequence_id: Any) -> float:
        if sequence_id in self.fail_start:
            raise RuntimeError(f"no room for {sequence_id}")
        self.starts.append(sequence_id)
        return 0.0

    def infer(self, steps: Sequence[mds.SequenceStep[float, float]]) -> list[Any]:
        ids = [step.sequence_id for step in steps]
        assert len(set(ids)) == len(ids), f"two steps of one sequence in a batch: {ids}"
        self.batches.append(ids)
        outputs: list[Any] = []
        for step in steps:
            self.seen.append((step.sequence_id, step.input))
            step.state += step.input  # set even for a failing step: it must not be kept
            if step.input < 0:
                outputs.append(mds.InvalidInput(f"negative input {step.input}"))
            else:
                outputs.append(step.state)
        return outputs

    def sequence_end(self, sequence_id: Any, state: Any, reason: mds.SequenceEnd) -> None:
        self.ends.append((sequence_id, state, reason))


class Held(RunningSum):
    """A running sum whose batches holding a ``hold`` input (any, if ``None``) wait for ``gate``."""

    def __init__(self, gate: anyio.Event, hold: float | None = 99.0) -> None:
        super().__init__()
        self.gate, self.hold = gate, hold

    async def infer(self, steps: Sequence[mds.SequenceStep[float, float]]) -> list[Any]:  # type: ignore[override]
        if self.hold is None or any(step.input == self.hold for step in steps):
            await self.gate.wait()
        return RunningSum.infer(self, steps)


def stateful(max_batch_size: int = 8, instances: int = 1, **sequences: Any) -> mds.ModelConfig:
    return mds.ModelConfig(
        instances=instances,
        batching=mds.BatchingConfig(max_batch_size=max_batch_size),
        sequences=mds.SequenceConfig(**sequences),
    )


async def steps_of(model: Any, sequence_id: Any, inputs: list[float]) -> list[float]:
    """One client: each step after the last one's answer; the last ends the sequence."""
    out = []
    for index, value in enumerate(inputs):
        out.append(
            await model.serve(
                value,
                sequence_id=sequence_id,
                sequence_start=index == 0,
                sequence_end=index == len(inputs) - 1,
            )
        )
    return out


async def admitted(model: mds.ModelRuntime[Any, Any], requests: int) -> None:
    """Wait until ``model`` has taken ``requests`` requests in: their order is set then.

    (trio runs new tasks in no set order: a step sent in a task of its own
    reaches the model when that task runs.)
    """
    while model.statistics().requests < requests:
        await anyio.lowlevel.checkpoint()


async def ends(handler: RunningSum, count: int) -> list[tuple[Any, Any, mds.SequenceEnd]]:
    """``handler.ends`` once it has ``count`` (end hooks run just after a sequence ends)."""
    await eventually(lambda: len(handler.ends) >= count, f"{count} sequence ends")
    return handler.ends


def running(inputs: list[float]) -> list[float]:
    total, out = 0.0, []
    for value in inputs:
        total += value
        out.append(total)
    return out


async def test_interleaved_sequences_equal_each_computed_alone() -> None:
    handler = RunningSum()
    plans = {f"s{i}": [float(random.randint(0, 9)) for _ in range(12)] for i in range(30)}
    plans.update({i: [1.0, 2.0, 3.0] for i in range(1, 6)})  # integer ids too
    results: dict[Any, list[float]] = {}
    async with mds.ModelRuntime(handler, stateful()) as model:

        async def client(sequence_id: Any) -> None:
            results[sequence_id] = await steps_of(model, sequence_id, plans[sequence_id])

        async with anyio.create_task_group() as tasks:
            for sequence_id in plans:
                tasks.start_soon(client, sequence_id)
        stats = model.statistics()
    assert results == {sequence_id: running(plan) for sequence_id, plan in plans.items()}
    assert max(len(batch) for batch in handler.batches) > 1  # sequences batched together
    assert sorted(map(str, handler.starts)) == sorted(map(str, plans))
    assert {(e[0], e[2]) for e in handler.ends} == {(s, mds.SequenceEnd.ENDED) for s in plans}
    assert {e[0]: e[1] for e in handler.ends} == {s: sum(p) for s, p in plans.items()}
    assert stats.sequences == 0
    assert stats.sequences_started == len(plans)
    assert stats.sequence_ends == {"ended": len(plans)}


async def test_steps_sent_without_waiting_run_in_order_one_per_batch() -> None:
    handler = RunningSum()
    async with mds.ModelRuntime(handler, stateful(max_queued_steps=50)) as model:
        answers: dict[int, float] = {}

        async def step(index: int) -> None:
            answers[index] = await model.serve(
                float(index), sequence_id="a", sequence_start=index == 0, sequence_end=index == 19
            )

        async with anyio.create_task_group() as tasks:
            for index in range(20):
                tasks.start_soon(step, index)
                await admitted(model, index + 1)
    assert [answers[i] for i in range(20)] == running([float(i) for i in range(20)])
    assert [value for _, value in handler.seen] == [float(i) for i in range(20)]
    assert all(len(batch) == 1 for batch in handler.batches)


async def test_a_failed_step_leaves_the_state_and_the_sequence_goes_on() -> None:
    handler = RunningSum()
    async with mds.ModelRuntime(handler, stateful()) as model:
        assert await model.serve(2.0, sequence_id=7, sequence_start=True) == 2.0
        with pytest.raises(mds.InvalidInput, match="negative input"):
            await model.serve(-5.0, sequence_id=7)
        assert await model.serve(1.0, sequence_id=7, sequence_end=True) == 3.0
    assert handler.ends == [(7, 3.0, mds.SequenceEnd.ENDED)]


async def test_a_failed_first_step_ends_the_sequence_so_it_can_start_again() -> None:
    handler = RunningSum(fail_start=frozenset({"no-room"}))
    async with mds.ModelRuntime(handler, stateful()) as model:
        with pytest.raises(mds.InvalidInput, match="negative input"):
            await model.serve(-1.0, sequence_id="x", sequence_start=True)
        assert await ends(handler, 1) == [("x", 0.0, mds.SequenceEnd.FAILED)]
        assert await model.serve(4.0, sequence_id="x", sequence_start=True) == 4.0
        with pytest.raises(mds.InferenceError, match=r"sequence_start failed.*no room"):
            await model.serve(1.0, sequence_id="no-room", sequence_start=True)
        with pytest.raises(mds.InvalidInput, match="'no-room' is not live: it ended \\(failed\\)"):
            await model.serve(1.0, sequence_id="no-room")
    # sequence_start never succeeded for "no-room": nothing for sequence_end to release.
    assert [end[0] for end in handler.ends] == ["x", "x"]


async def test_flags_that_do_not_fit_are_refused_naming_the_sequence() -> None:
    handler = RunningSum()
    async with mds.ModelRuntime(handler, stateful()) as model:
        with pytest.raises(mds.InvalidInput, match="stateful: each request is a step"):
            await model.serve(1.0)
        with pytest.raises(mds.InvalidInput, match="'ghost' is not live: its first step"):
            await model.serve(1.0, sequence_id="ghost")
        await model.serve(1.0, sequence_id="a", sequence_start=True)
        with pytest.raises(mds.InvalidInput, match="'a' is already live"):
            await model.serve(1.0, sequence_id="a", sequence_start=True)
        await model.serve(1.0, sequence_id="a", sequence_end=True)
        with pytest.raises(mds.InvalidInput, match="'a' is not live: it ended \\(ended\\)"):
            await model.serve(1.0, sequence_id="a")
        for bad in (0, "", True, 1.5):
            with pytest.raises(mds.InvalidInput, match="is not a sequence id"):
                await model.serve(1.0, sequence_id=bad, sequence_start=True)  # type: ignore[arg-type]
        with pytest.raises(mds.InvalidInput, match="need a sequence id"):
            await model.serve(1.0, sequence_start=True)
        outcomes = await model.serve_many([1.0, 2.0])  # no sequence: each refused alone
        assert all(isinstance(o, mds.InvalidInput) for o in outcomes)
    async with mds.ModelRuntime(RunningSum(), name="plain") as plain:
        with pytest.raises(mds.InvalidInput, match="not stateful") as caught:
            await plain.serve(1.0, sequence_id="a", sequence_start=True)
    assert caught.value.model == "plain"


async def test_a_step_after_the_last_one_is_refused() -> None:
    handler = RunningSum()
    gate = anyio.Event()

    class Slow(RunningSum):
        async def infer(self, steps: Sequence[mds.SequenceStep[float, float]]) -> list[Any]:  # type: ignore[override]
            await gate.wait()
            return RunningSum.infer(self, steps)

    handler = Slow()
    async with mds.ModelRuntime(handler, stateful()) as model:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: model.serve(1.0, sequence_id="a", sequence_start=True))
            await anyio.sleep(0.01)
            tasks.start_soon(lambda: model.serve(2.0, sequence_id="a", sequence_end=True))
            await anyio.sleep(0.01)
            with pytest.raises(mds.InvalidInput, match="has had its last step"):
                await model.serve(3.0, sequence_id="a")
            gate.set()
    assert handler.ends == [("a", 3.0, mds.SequenceEnd.ENDED)]


async def test_limits_are_overloaded_not_a_hang() -> None:
    handler = Held(anyio.Event(), hold=None)
    handler.gate.set()
    async with mds.ModelRuntime(handler, stateful(max_sequences=2, max_queued_steps=2)) as model:
        await model.serve(1.0, sequence_id=1, sequence_start=True)
        await model.serve(1.0, sequence_id=2, sequence_start=True)
        with pytest.raises(mds.Overloaded, match=r"2 sequences are live.*max_sequences.*3"):
            await model.serve(1.0, sequence_id=3, sequence_start=True)
        handler.gate = gate = anyio.Event()
        async with anyio.create_task_group() as tasks:
            for _ in range(3):  # one computing, two waiting
                tasks.start_soon(lambda: model.serve(1.0, sequence_id=1))
                await anyio.sleep(0.01)
            with pytest.raises(mds.Overloaded, match="sequence 1 has 2 steps waiting"):
                await model.serve(1.0, sequence_id=1)
            gate.set()
        await model.serve(1.0, sequence_id=2, sequence_end=True)  # one fewer live: room
        assert await model.serve(5.0, sequence_id=3, sequence_start=True) == 5.0


@pytest.mark.virtual_time
async def test_an_idle_sequence_ends_and_its_hook_runs() -> None:
    handler = RunningSum()
    async with mds.ModelRuntime(handler, stateful(idle_timeout=30.0)) as model:
        await model.serve(1.0, sequence_id="quiet", sequence_start=True)
        await model.serve(1.0, sequence_id="busy", sequence_start=True)
        for _ in range(5):
            await anyio.sleep(10)
            await model.serve(1.0, sequence_id="busy")
        assert await ends(handler, 1) == [("quiet", 1.0, mds.SequenceEnd.IDLE)]
        with pytest.raises(mds.InvalidInput, match="'quiet' is not live: it ended \\(idle\\)"):
            await model.serve(1.0, sequence_id="quiet")
        assert model.statistics().sequences == 1
        await anyio.sleep(31)
        assert (await ends(handler, 2))[-1] == ("busy", 6.0, mds.SequenceEnd.IDLE)
        assert model.statistics().sequence_ends == {"idle": 2}


async def test_a_cancelled_step_ends_its_sequence() -> None:
    gate = anyio.Event()
    handler = Held(gate)
    async with mds.ModelRuntime(handler, stateful()) as model:
        await model.serve(1.0, sequence_id="c", sequence_start=True)
        waiting: list[Any] = []

        async def step(value: float) -> None:
            try:
                waiting.append(await model.serve(value, sequence_id="c"))
            except mds.MdsError as exc:
                waiting.append(exc)

        with anyio.move_on_after(0.05):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(step, 99.0)  # computing
                await anyio.sleep(0.01)
                tasks.start_soon(step, 2.0)  # waits its turn behind it
                await anyio.sleep(1)
        gate.set()
        await ends(handler, 1)
        # The computing step's caller left: whether it counted is unknown, so it ends.
        assert handler.ends == [("c", 100.0, mds.SequenceEnd.CANCELLED)]
        with pytest.raises(mds.InvalidInput, match="ended \\(cancelled\\)"):
            await model.serve(1.0, sequence_id="c")
        # Another sequence is untouched.
        assert await model.serve(1.0, sequence_id="d", sequence_start=True) == 1.0


async def test_a_step_whose_deadline_passes_in_line_is_not_computed_and_ends_it() -> None:
    gate = anyio.Event()
    handler = Held(gate)
    async with mds.ModelRuntime(handler, stateful()) as model:
        await model.serve(1.0, sequence_id="d", sequence_start=True)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: model.serve(99.0, sequence_id="d"))
            await anyio.sleep(0.01)
            with pytest.raises(
                mds.DeadlineExceeded, match="behind the earlier steps of sequence 'd'"
            ):
                await model.serve(5.0, sequence_id="d", timeout=0.02)
            gate.set()
        # The steps after it would miss it: the sequence ended, and says why.
        with pytest.raises(mds.InvalidInput, match=r"'d' is not live: it ended \(expired\)"):
            await model.serve(1.0, sequence_id="d", sequence_end=True)
        assert (await ends(handler, 1)) == [("d", 100.0, mds.SequenceEnd.EXPIRED)]
    assert 5.0 not in [value for _, value in handler.seen]


async def test_stopping_ends_live_sequences_with_a_reason() -> None:
    handler = RunningSum()
    model = mds.ModelRuntime(handler, stateful())
    async with model:
        await model.serve(1.0, sequence_id="left", sequence_start=True)
    assert handler.ends == [("left", 1.0, mds.SequenceEnd.STOPPED)]
    async with model:  # started again: nothing is left of the old sequences
        with pytest.raises(mds.InvalidInput, match="not live"):
            await model.serve(1.0, sequence_id="left")


async def test_drain_takes_live_sequences_steps_but_no_new_ones() -> None:
    handler = RunningSum()
    config = mds.ModelConfig(sequences=mds.SequenceConfig(on_stop="drain"), drain_timeout=30.0)
    model = mds.ModelRuntime(handler, config)
    outcomes: list[Any] = []
    async with anyio.create_task_group() as tasks:
        async with model:
            await model.serve(1.0, sequence_id="d", sequence_start=True)

            async def client() -> None:
                await eventually(lambda: model.state is mds.ModelState.DRAINING, "draining")
                try:
                    await model.serve(1.0, sequence_id="new", sequence_start=True)
                except mds.MdsError as exc:
                    outcomes.append(exc)
                outcomes.append(await model.serve(2.0, sequence_id="d"))
                outcomes.append(await model.serve(3.0, sequence_id="d", sequence_end=True))

            tasks.start_soon(client)
    assert isinstance(outcomes[0], mds.NotReady)
    assert outcomes[1:] == [3.0, 6.0]
    assert handler.ends == [("d", 6.0, mds.SequenceEnd.ENDED)]


async def test_pinned_sequences_stay_on_the_instance_that_started_them() -> None:
    handlers: list[RunningSum] = []

    def make() -> RunningSum:
        handlers.append(RunningSum())
        return handlers[-1]

    config = stateful(instances=2, pinned=True)
    plans = {f"p{i}": [float(i)] * 6 for i in range(8)}
    async with mds.ModelRuntime(make, config) as model:
        results = {}

        async def client(sequence_id: str) -> None:
            results[sequence_id] = await steps_of(model, sequence_id, plans[sequence_id])

        async with anyio.create_task_group() as tasks:
            for sequence_id in plans:
                tasks.start_soon(client, sequence_id)
        assert model.statistics().queued == 0
    assert results == {s: running(p) for s, p in plans.items()}
    homes: dict[str, set[int]] = {}
    for handler in handlers:
        for sequence_id, _ in handler.seen:
            homes.setdefault(sequence_id, set()).add(handler.instance)
        for sequence_id, _, _ in handler.ends:
            assert handler.instance in homes[sequence_id]
    assert all(len(instances) == 1 for instances in homes.values())
    assert {next(iter(i)) for i in homes.values()} == {0, 1}  # spread over both


async def test_warm_up_runs_each_example_as_a_sequence_of_its_own() -> None:
    class Warmed(RunningSum):
        def warmup(self) -> list[float]:
            return [1.0, 2.0]

    handler = Warmed()
    config = mds.ModelConfig(
        batching=mds.BatchingConfig(max_batch_size=2), sequences=mds.SequenceConfig()
    )
    async with mds.ModelRuntime(handler, config):
        assert len(handler.starts) == 3  # sizes 1 and 2
        assert [end[2] for end in handler.ends] == [mds.SequenceEnd.ENDED] * 3


async def test_a_collator_is_refused_on_a_stateful_model() -> None:
    class Stacked(RunningSum):
        collator = mds.Stack()

    model = mds.ModelRuntime(Stacked(), stateful())
    with pytest.raises(mds.LifecycleError, match=r"stateful.*collator"):
        async with model:
            pass


def test_sync_callers_and_the_runtime_by_name() -> None:
    handler = RunningSum()
    runtime = mds.Runtime()
    runtime.add_model("sum", handler, stateful())
    with runtime:
        assert runtime.serve_sync("sum", 1.0, sequence_id="s", sequence_start=True) == 1.0
        assert mds.serve_sync("sum", 2.0, sequence_id="s") == 3.0
        chunks = list(runtime.stream_sync("sum", 3.0, sequence_id="s", sequence_end=True))
        assert chunks == [6.0]
    assert handler.ends == [("s", 6.0, mds.SequenceEnd.ENDED)]


async def test_a_pipeline_passes_the_sequence_to_its_stateful_node() -> None:
    handler = RunningSum()
    runtime = mds.Runtime()
    runtime.add_model("sum", handler, stateful())
    runtime.add_pipeline(
        mds.Pipeline(
            "p", [mds.Node.function("scale", lambda x: x * 1.0), mds.Node.model("add", model="sum")]
        )
    )
    async with runtime:
        assert runtime.servable("p").stateful
        assert await runtime.serve("p", 1.0, sequence_id=1, sequence_start=True) == 1.0
        assert await runtime.serve("p", 2.0, sequence_id=1, sequence_end=True) == 3.0


async def test_a_reload_ends_the_old_sequences_as_swapped() -> None:
    handlers: list[RunningSum] = []

    def make() -> RunningSum:
        handlers.append(RunningSum())
        return handlers[-1]

    runtime = mds.Runtime()
    runtime.add_model("sum", make, stateful())
    async with runtime:
        await runtime.serve("sum", 1.0, sequence_id="old", sequence_start=True)
        await runtime.load_model("sum", make, stateful(), version="1")
        assert await ends(handlers[0], 1)
        assert handlers[0].ends == [("old", 1.0, mds.SequenceEnd.SWAPPED)]
        # Its next step reaches the new version, which says why it is gone.
        with pytest.raises(mds.InvalidInput, match=r"'old' is not live: it ended \(swapped\)"):
            await runtime.serve("sum", 2.0, sequence_id="old")
        assert await runtime.serve("sum", 2.0, sequence_id="old", sequence_start=True) == 2.0


async def test_a_late_step_is_told_which_version_ended_its_sequence() -> None:
    runtime = mds.Runtime()
    runtime.add_model("sum", RunningSum(), stateful(), policy=mds.VersionPolicy(all=True))
    async with runtime:
        await runtime.load_model("sum", RunningSum(), stateful(), version="2")
        one, two = runtime.servable("sum", "1"), runtime.servable("sum", "2")
        await one.serve(1.0, sequence_id="a", sequence_start=True, sequence_end=True)
        await one.serve(1.0, sequence_id="b", sequence_start=True, sequence_end=True)
        # Another "a" starts on version 2: version 1's end of its own "a" stays on record.
        await two.serve(1.0, sequence_id="a", sequence_start=True)
        with pytest.raises(mds.InvalidInput, match=r"'a' is not live: it ended \(ended\); start"):
            await one.serve(2.0, sequence_id="a")
        with pytest.raises(
            mds.InvalidInput, match=r"'b' is not live: it ended \(ended\) on version 1"
        ):
            await two.serve(2.0, sequence_id="b")
        assert await two.serve(2.0, sequence_id="a", sequence_end=True) == 3.0


async def test_a_traffic_split_keeps_each_sequence_on_its_version() -> None:
    handlers: dict[str, RunningSum] = {"1": RunningSum(), "2": RunningSum()}
    runtime = mds.Runtime()
    runtime.add_model("sum", handlers["1"], stateful(), policy=mds.VersionPolicy(all=True))
    async with runtime:
        await runtime.load_model("sum", handlers["2"], stateful(), version="2")
        await runtime.set_traffic("sum", {"1": 0.5, "2": 0.5})
        for index in range(20):
            await steps_of(runtime.servable("sum"), f"t{index}", [1.0, 1.0, 1.0])
        for _ in range(10):  # a second start of a live id is refused, whichever version
            await runtime.serve("sum", 1.0, sequence_id="twice", sequence_start=True)
            with pytest.raises(mds.InvalidInput, match="'twice' is already live"):
                await runtime.serve("sum", 1.0, sequence_id="twice", sequence_start=True)
            await runtime.serve("sum", 1.0, sequence_id="twice", sequence_end=True)
    for handler in handlers.values():
        per_sequence: dict[str, int] = {}
        for sequence_id, _ in handler.seen:
            if sequence_id != "twice":
                per_sequence[sequence_id] = per_sequence.get(sequence_id, 0) + 1
        assert set(per_sequence.values()) <= {3}  # all of a sequence's steps, or none
    assert handlers["1"].seen and handlers["2"].seen


step_plan = st.lists(
    st.tuples(st.integers(0, 5), st.sampled_from(["send", "send", "wait", "yield"])),
    min_size=1,
    max_size=60,
)


@settings(max_examples=30, deadline=None)
@given(plan=step_plan, max_batch_size=st.integers(1, 4), instances=st.integers(1, 2))
async def test_any_interleaving_keeps_each_sequences_order_and_answers_each_step_once(
    plan: list[tuple[int, str]], max_batch_size: int, instances: int
) -> None:
    handlers: list[RunningSum] = []

    def make() -> RunningSum:
        handlers.append(RunningSum())
        return handlers[-1]

    config = stateful(max_batch_size, instances, max_queued_steps=100)
    sent: dict[int, list[float]] = {}
    answers: dict[tuple[int, int], list[Any]] = {}
    async with mds.ModelRuntime(make, config) as model:
        async with anyio.create_task_group() as tasks:

            async def step(sequence: int, index: int, value: float, start: bool) -> None:
                answer = await model.serve(value, sequence_id=sequence + 1, sequence_start=start)
                answers.setdefault((sequence, index), []).append(answer)

            for sequence, action in plan:
                if action == "yield":
                    await anyio.lowlevel.checkpoint()
                    continue
                values = sent.setdefault(sequence, [])
                values.append(float(len(values) + 1))
                coroutine = step(sequence, len(values) - 1, values[-1], len(values) == 1)
                if action == "wait":
                    await coroutine
                else:
                    tasks.start_soon(lambda c=coroutine: c)  # type: ignore[misc]
                    await admitted(model, sum(map(len, sent.values())))
    for sequence, values in sent.items():
        assert [answers[(sequence, i)] for i in range(len(values))] == [
            [total] for total in running(values)
        ]
        computed = [v for h in handlers for s, v in h.seen if s == sequence + 1]
        assert sorted(computed) == values  # each step computed once
    for handler in handlers:
        for batch in handler.batches:
            assert len(batch) <= max_batch_size


def test_the_sequence_settings_come_from_a_config_file_and_are_checked() -> None:
    import msgspec

    config = msgspec.convert(
        {"sequences": {"idle_timeout": 5, "pinned": True, "on_stop": "drain"}}, mds.ModelConfig
    )
    assert config.sequences == mds.SequenceConfig(idle_timeout=5.0, pinned=True, on_stop="drain")
    with pytest.raises(mds.ConfigError, match="max_sequences"):
        mds.SequenceConfig(max_sequences=0)
    with pytest.raises(msgspec.ValidationError, match="on_stop"):
        msgspec.convert({"sequences": {"on_stop": "wait"}}, mds.ModelConfig)


async def test_a_stop_with_steps_queued_and_computing_ends_each_sequence_once() -> None:
    gate = anyio.Event()
    handler = Held(gate)
    config = mds.ModelConfig(
        batching=mds.BatchingConfig(max_batch_size=2),
        sequences=mds.SequenceConfig(),
        drain_timeout=0.05,
    )
    outcomes: list[Any] = []

    async def step(value: float, sequence_id: int) -> None:
        try:
            outcomes.append(await model.serve(value, sequence_id=sequence_id))
        except mds.MdsError as exc:
            outcomes.append(exc)

    model = mds.ModelRuntime(handler, config)
    async with anyio.create_task_group() as tasks:
        async with model:
            for sequence_id in range(1, 6):
                await model.serve(1.0, sequence_id=sequence_id, sequence_start=True)
            for sequence_id in range(1, 6):  # one batch of two computing, the rest queued
                tasks.start_soon(step, 99.0, sequence_id)
                tasks.start_soon(step, 2.0, sequence_id)  # waits its turn
            await anyio.sleep(0.05)
    assert len(outcomes) == 10
    # (trio starts tasks in no set order: a 2.0 may go before its sequence's 99.)
    assert all(isinstance(outcome, float | mds.Unavailable) for outcome in outcomes), outcomes
    assert sum(isinstance(outcome, mds.Unavailable) for outcome in outcomes) >= 5
    assert sorted(end[0] for end in handler.ends) == [1, 2, 3, 4, 5]  # each once
    assert {end[2] for end in handler.ends} == {mds.SequenceEnd.STOPPED}


class SlowSteps(RunningSum):
    """A negative first input fails preprocess (late); a 2.0 is preprocessed slowly."""

    async def preprocess(self, value: float) -> float:  # type: ignore[override]
        if value < 0:
            await anyio.sleep(0.01)
            raise mds.InvalidInput("a bad first step")
        if value == 2.0:
            await anyio.sleep(0.1)
        return value

    async def postprocess(self, output: float) -> float:  # type: ignore[override]
        if output >= 50:
            await anyio.sleep(1)  # its caller leaves meanwhile
        return output


async def test_a_step_whose_sequence_ended_during_its_preprocess_never_runs() -> None:
    handler = SlowSteps()
    async with mds.ModelRuntime(handler, stateful()) as model:
        outcomes: dict[str, Any] = {}

        async def send(name: str, value: float, start: bool) -> None:
            try:
                outcomes[name] = await model.serve(value, sequence_id="s", sequence_start=start)
            except mds.MdsError as exc:
                outcomes[name] = exc

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(send, "first", -1.0, True)
            await admitted(model, 1)
            tasks.start_soon(send, "second", 2.0, False)
            await admitted(model, 2)
        assert isinstance(outcomes["first"], mds.InvalidInput)
        assert isinstance(outcomes["second"], mds.InvalidInput)
        assert "sequence 's' ended (failed) before this step was computed" in str(
            outcomes["second"]
        )
        stats = model.statistics()
        assert (stats.sequences, stats.sequence_ends) == (0, {"failed": 1})
    assert handler.starts == [] and handler.seen == [] and handler.ends == []


async def test_a_caller_that_leaves_after_its_step_was_computed_ends_the_sequence() -> None:
    handler = SlowSteps()
    async with mds.ModelRuntime(handler, stateful()) as model:
        await model.serve(1.0, sequence_id="p", sequence_start=True)
        with anyio.move_on_after(0.1):
            await model.serve(50.0, sequence_id="p")  # left during postprocess
        assert await ends(handler, 1) == [("p", 51.0, mds.SequenceEnd.CANCELLED)]
        await model.serve(1.0, sequence_id="q", sequence_start=True)
        with pytest.raises(mds.DeadlineExceeded):
            await model.serve(60.0, sequence_id="q", timeout=0.1)  # expired in postprocess
        assert (await ends(handler, 2))[1] == ("q", 61.0, mds.SequenceEnd.EXPIRED)


async def test_unloading_a_version_ends_its_sequences_as_stopped_and_the_rest_serve_on() -> None:
    gate = anyio.Event()
    first, second = Held(gate), Held(gate)
    config = mds.ModelConfig(sequences=mds.SequenceConfig(), drain_timeout=5.0)
    runtime = mds.Runtime()
    runtime.add_model("m", first, config, policy=mds.VersionPolicy(all=True))
    async with runtime:
        await runtime.load_model("m", second, config, version="2", default=False)
        one = runtime.servable("m", version="1")
        await one.serve(1.0, sequence_id="s", sequence_start=True)
        await one.serve(1.0, sequence_id="busy", sequence_start=True)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(lambda: one.serve(99.0, sequence_id="busy"))  # in flight
            await anyio.sleep(0.05)
            tasks.start_soon(runtime.unload_model, "m", "1")
            await anyio.sleep(0.05)
            # Its version stops: a client's mistake to send it now, never a server error.
            with pytest.raises(mds.InvalidInput, match="'s' is not live"):
                await runtime.serve("m", 1.0, sequence_id="s")
            gate.set()
        assert await runtime.serve("m", 5.0, sequence_id="s", sequence_start=True) == 5.0
    assert sorted((e[0], e[2]) for e in first.ends) == [
        ("busy", mds.SequenceEnd.STOPPED),
        ("s", mds.SequenceEnd.STOPPED),
    ]
