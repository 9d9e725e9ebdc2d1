"""The numbers behind the metrics: histograms and pipeline counters, as Python reads them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import anyio
import msgspec
import pytest

import mds


class Words(mds.ModelHandler[str, str]):
    def infer(self, batch: Sequence[str]) -> list[str]:
        return [text.upper() for text in batch]

    def postprocess(self, output: str) -> Iterator[str]:
        yield from output.split()


class Times(mds.ModelHandler[float, float]):
    def __init__(self, factor: float) -> None:
        self.factor = factor

    def infer(self, batch: Sequence[float]) -> list[float]:
        if any(x < 0 for x in batch):
            raise ValueError("negative")
        return [x * self.factor for x in batch]


def ensemble() -> mds.Pipeline:
    return mds.Pipeline(
        "ensemble",
        [
            mds.Node.fan_out("both", ["double", "triple"]),
            mds.Node.model("double", lambda: Times(2.0)),
            mds.Node.model("triple", lambda: Times(3.0)),
        ],
    )


async def test_a_stream_is_timed_to_its_end() -> None:
    runtime = mds.Runtime()
    runtime.add_model("words", Words)
    async with runtime:
        words = [w async for w in runtime.servable("words").stream("one two three")]
        assert words == ["ONE", "TWO", "THREE"]
        stats = runtime.statistics()["words"]
    histograms = stats.histograms
    assert histograms.request.count == 1 and histograms.postprocess.count == 1
    assert histograms.first_chunk.count == 1
    assert histograms.first_chunk.sum <= histograms.request.sum
    assert histograms.request.sum >= histograms.postprocess.sum >= 0
    assert histograms.queue_wait.count == histograms.batch_size.count == 1


async def test_a_fan_out_counts_each_branch_and_the_pipeline() -> None:
    runtime = mds.Runtime()
    runtime.add_pipeline(ensemble())
    async with runtime:
        async with anyio.create_task_group() as tasks:
            for x in range(10):
                tasks.start_soon(runtime.serve, "ensemble", float(x))
        with pytest.raises(mds.InferenceError):
            await runtime.serve("ensemble", -1.0)
        stats = runtime.pipeline_statistics()["ensemble"]
        models = runtime.statistics()
    assert (stats.requests, stats.completed, stats.failed, stats.in_flight) == (11, 10, 1, 0)
    assert stats.errors == {"InferenceError": 1}
    assert stats.request.count == 10
    both, double, triple = stats.nodes["both"], stats.nodes["double"], stats.nodes["triple"]
    assert (both.kind, both.calls, both.failed) == ("fan_out", 11, 1)
    assert double.kind == triple.kind == "model"
    # The branch that fails first cancels the other (not counted as failed).
    assert double.failed + triple.failed in (1, 2)
    assert 10 <= triple.calls <= 11 and triple.seconds.count == triple.calls
    # A fan-out's time holds its branches'.
    assert both.seconds.sum >= max(double.seconds.sum, triple.seconds.sum)
    # Each request a branch served went through its model's batches (a
    # cancelled one may have left the queue before its batch).
    assert 10 <= models["ensemble.double"].histograms.batch_size.sum <= 11


async def test_a_pipeline_refused_while_its_models_are_not_ready_counts_rejected() -> None:
    runtime = mds.Runtime()
    pipeline = runtime.add_pipeline(ensemble())
    with pytest.raises(mds.NotReady):
        await pipeline.serve(1.0)
    stats = pipeline.statistics()
    assert (stats.requests, stats.rejected, stats.errors) == (0, 1, {"NotReady": 1})


def test_statistics_with_histograms_travel_as_json() -> None:
    runtime = mds.Runtime()
    runtime.add_model("words", Words)
    runtime.start_sync(load="wait")
    try:
        assert list(runtime.servable("words").stream_sync("a b")) == ["A", "B"]
        stats = runtime.statistics()["words"]
    finally:
        runtime.stop_sync()
    again = msgspec.json.decode(msgspec.json.encode(stats), type=mds.ModelStatistics)
    assert again == stats
    assert again.histograms.request.count == 1


def test_histograms_of_different_buckets_do_not_mix() -> None:
    a = mds.Histogram(bounds=(1.0,), counts=(1, 0), sum=0.5)
    b = mds.Histogram(bounds=(2.0,), counts=(0, 1), sum=3.0)
    with pytest.raises(ValueError, match="different buckets"):
        a + b
    with pytest.raises(ValueError, match="different buckets"):
        a - b
    assert (a + a - a) == a
    assert a.mean == 0.5 and mds.Histogram().mean == 0.0 and mds.Histogram().quantile(0.5) == 0


def test_a_quantile_interpolates_inside_its_bucket() -> None:
    histogram = mds.Histogram(bounds=(1.0, 2.0, 4.0), counts=(0, 4, 4, 0), sum=20.0)
    assert histogram.quantile(0.25) == pytest.approx(1.5)
    assert histogram.quantile(0.5) == pytest.approx(2.0)
    assert histogram.quantile(0.75) == pytest.approx(3.0)
    assert histogram.cumulative() == [(1.0, 0), (2.0, 4), (4.0, 8), (float("inf"), 8)]


class Slow(mds.ModelHandler[float, float]):
    async def infer(self, batch: Sequence[float]) -> list[float]:
        await anyio.sleep(0.5)
        return list(batch)


class Broken(mds.ModelHandler[float, float]):
    def init(self, context: mds.ModelContext) -> None:
        raise OSError("no weights here")

    def infer(self, batch: Sequence[float]) -> list[float]:
        return list(batch)


async def test_each_outcome_is_counted_once_where_the_request_ends() -> None:
    runtime = mds.Runtime()
    runtime.add_model("slow", Slow)
    async with runtime:
        with pytest.raises(mds.DeadlineExceeded):
            await runtime.serve("slow", 1.0, timeout=0.05)
        stats = runtime.statistics()["slow"]
    assert (stats.requests, stats.failed, stats.deadline_misses, stats.invalid) == (1, 1, 1, 0)
    assert stats.in_flight == 0 and stats.errors == {"DeadlineExceeded": 1}


async def test_requests_an_on_demand_model_cannot_take_are_counted() -> None:
    runtime = mds.Runtime()
    runtime.add_model("broken", Broken, on_demand=True)
    async with runtime:
        for _ in range(2):
            with pytest.raises(mds.NotReady):
                await runtime.serve("broken", 1.0)
        outcomes = await runtime.servable("broken").serve_many([1.0, 2.0, 3.0])
        assert all(isinstance(outcome, mds.NotReady) for outcome in outcomes)
        stats = runtime.statistics()["broken"]
    assert stats.rejected == 5 and stats.errors == {"NotReady": 5}
    assert stats.in_flight == 0


class SlowToLoad(mds.ModelHandler[float, float]):
    def init(self, context: mds.ModelContext) -> None:
        import time

        time.sleep(0.3)

    def infer(self, batch: Sequence[float]) -> list[float]:
        return list(batch)


async def test_a_request_refused_while_its_model_loads_is_never_counted_twice() -> None:
    runtime = mds.Runtime()
    runtime.add_model("slow", SlowToLoad, on_demand=True)
    async with runtime:
        model = runtime.model("slow")
        failures: list[BaseException] = []

        async def call() -> None:
            try:
                await runtime.serve("slow", 1.0)
            except mds.MdsError as exc:
                failures.append(exc)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(call)
            await anyio.sleep(0.1)  # loading now
            await runtime.unload_model("slow")
        stats = model.statistics()
    assert [type(f) for f in failures] == [mds.NotReady]
    # Once at most: the unloaded version hands it on (to no version now), not counting it.
    assert stats.rejected <= 1 and stats.in_flight == 0


def test_durations_are_timed_finer_than_uvloops_clock() -> None:
    """uvloop's ``loop.time()`` counts whole milliseconds; mds's durations do not.

    With its clock every quick request took 0 or 1 ms, and the protocol's
    statistics could say a served request took no time at all.
    """
    uvloop = pytest.importorskip("uvloop", reason="uvloop's clock is what this checks")

    async def served() -> mds.ModelStatistics:
        runtime = mds.Runtime()
        runtime.add_model("times", lambda: Times(2.0))
        async with runtime:
            for x in range(20):
                assert await runtime.serve("times", float(x)) == 2.0 * x
            return runtime.model("times").statistics()

    histograms = uvloop.run(served()).histograms
    for name in ("request", "queue_wait", "infer"):
        histogram = getattr(histograms, name)
        assert histogram.count >= 1 and histogram.sum > 0, name
        milliseconds = histogram.sum * 1000
        assert abs(milliseconds - round(milliseconds)) > 1e-9, (name, histogram.sum)
