"""Checked by mypy (see test_typing.py): user types survive mds's generics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, assert_type

import mds
import mds.testing


class Label(str):
    pass


class Classifier(mds.ModelHandler[list[float], Label]):
    def infer(self, batch: Sequence[list[float]]) -> list[Label]:
        return [Label("cat") for _ in batch]


class AsyncClassifier(mds.ModelHandler[bytes, dict[str, float]]):
    async def init(self, context: mds.ModelContext) -> None:
        assert_type(context.device, mds.Device)

    async def infer(self, batch: Sequence[bytes]) -> list[dict[str, float]]:
        return [{"score": float(len(item))} for item in batch]


async def typed_calls() -> None:
    model = mds.ModelRuntime(Classifier)
    assert_type(model, mds.ModelRuntime[list[float], Label])
    assert_type(await model.serve([1.0, 2.0]), Label)
    assert_type(model.serve_sync([1.0]), Label)
    traced = await model.serve([1.0], trace=True)
    assert_type(traced, mds.Traced[Label])
    assert_type(traced.value, Label)
    assert_type(traced.trace.queue_wait, float)

    runtime = mds.Runtime()
    other = runtime.add_model("async", AsyncClassifier, mds.ModelConfig(instances=2))
    assert_type(other, mds.ModelRuntime[bytes, dict[str, float]])
    assert_type(await other.serve(b"x"), dict[str, float])
    assert_type(model.state, mds.ModelState)
    assert_type(await runtime.health(), mds.RuntimeHealth)
    assert_type(runtime.statistics()["async"], mds.ModelStatistics)

    report = mds.testing.run_lifecycle(Classifier(), [[1.0]])
    assert_type(report, mds.testing.LifecycleReport[Label])
    assert_type(report.outputs, list[Label | None])


class Summing(mds.ModelHandler[float, float]):
    def sequence_start(self, sequence_id: int | str) -> float:
        return 0.0

    def infer(self, steps: Sequence[mds.SequenceStep[float, float]]) -> list[float]:
        for step in steps:
            assert_type(step.state, float)
            step.state += step.input
        return [step.state for step in steps]

    def sequence_end(self, sequence_id: int | str, state: Any, reason: mds.SequenceEnd) -> None:
        assert_type(reason, mds.SequenceEnd)


async def stateful_calls() -> None:
    config = mds.ModelConfig(sequences=mds.SequenceConfig(idle_timeout=5.0, pinned=True))
    model = mds.ModelRuntime(Summing, config)
    assert_type(await model.serve(1.0, sequence_id="a", sequence_start=True), float)
    assert_type(model.serve_sync(2.0, sequence_id=7, sequence_end=True), float)
    assert_type(model.statistics().sequence_ends, dict[str, int])
    model.serve_sync(1.0, sequence_id=1.5)  # type: ignore[call-overload]


def wrong_request_type_is_caught() -> None:
    model = mds.ModelRuntime(Classifier)
    model.serve_sync("not a list")  # type: ignore[call-overload]


async def pipeline_traces() -> None:
    runtime = mds.Runtime()
    served = runtime.add_pipeline(mds.Pipeline("p", [mds.Node.function("f", abs)]))
    traced = await served.serve(1.0, trace=True)
    assert_type(traced, mds.Traced[Any, mds.PipelineTrace])
    assert_type(traced.trace.path, tuple[str, ...])


async def streaming_and_transports() -> None:
    from fastapi import APIRouter, FastAPI
    from flask import Blueprint, Flask

    import mds.fastapi
    import mds.flask

    runtime = mds.Runtime()
    async for chunk in runtime.stream("words", "a b"):
        assert_type(chunk, Any)
    for chunk in runtime.stream_sync("words", "a b"):
        assert_type(chunk, Any)
    assert_type(mds.fastapi.add_routes(FastAPI(), runtime, prefix="/ml"), APIRouter)
    assert_type(mds.fastapi.router(runtime), APIRouter)
    assert_type(mds.flask.blueprint(runtime), Blueprint)
    app = Flask(__name__)
    assert_type(mds.flask.add_routes(app, runtime, max_body_bytes=1024), Blueprint)
