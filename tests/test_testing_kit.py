"""``mds.testing``: run a handler's lifecycle and check batch invariance."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

import mds
import mds.testing
from mds import ModelState


class Scaler(mds.ModelHandler[list[float], dict[str, Any]]):
    """Scales 2-vectors; rejects others in preprocess."""

    def warmup(self) -> list[list[float]]:
        return [[0.0, 1.0]]

    def preprocess(self, request: list[float]) -> np.ndarray:
        if len(request) != 2:
            raise ValueError(f"expected 2 numbers, got {len(request)}")
        return np.asarray(request, dtype=np.float32)

    def infer(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(batch) * 3

    def postprocess(self, output: np.ndarray) -> dict[str, Any]:
        return {"y": output, "positive": bool(output.sum() > 0)}


INPUTS = [[1.0, 2.0], [3.0, -4.0], [5.0], [-6.0, -7.0], [8.0, 9.0]]


def test_run_lifecycle_reports_outputs_errors_states_and_timings() -> None:
    report = mds.testing.run_lifecycle(Scaler, INPUTS, batch_size=2)
    assert report.states == [
        ModelState.CREATED,
        ModelState.LOADING,
        ModelState.WARMING,
        ModelState.READY,
        ModelState.DRAINING,
        ModelState.STOPPED,
    ]
    assert report.health.ready
    assert not report.ok
    assert [e is None for e in report.errors] == [True, True, False, True, True]
    assert isinstance(report.errors[2], mds.InvalidInput)
    assert report.outputs[2] is None
    np.testing.assert_allclose(report.outputs[1]["y"], [9.0, -12.0])  # type: ignore[index]
    assert report.batch_sizes == [2, 1, 1]  # the third batch lost its bad input
    assert set(report.timings) == {
        "init",
        "warmup",
        "preprocess",
        "infer",
        "postprocess",
        "teardown",
    }
    assert all(seconds >= 0 for seconds in report.timings.values())
    with pytest.raises(mds.InvalidInput, match="expected 2 numbers, got 1") as info:
        report.raise_errors()
    assert info.value.__notes__ == ["(input 2 of 5)"]


def test_run_lifecycle_raises_when_the_handler_cannot_start() -> None:
    class NoWeights(Scaler):
        def init(self, context: mds.ModelContext) -> None:
            raise FileNotFoundError("scaler.pt")

    with pytest.raises(
        mds.LifecycleError, match="init of instance 0 on cpu raised FileNotFoundError"
    ):
        mds.testing.run_lifecycle(NoWeights, INPUTS)


def test_the_kit_works_inside_a_running_event_loop() -> None:
    """As in a notebook cell, where a loop already runs in this thread."""

    async def cell() -> list[Any]:
        report = mds.testing.run_lifecycle(Scaler(), [[1.0, 1.0]])
        mds.testing.assert_batch_invariant(Scaler, INPUTS)
        return report.outputs

    [output] = asyncio.run(cell())
    assert output is not None and output["positive"]


def test_batch_invariance_holds_for_a_correct_handler() -> None:
    mds.testing.assert_batch_invariant(Scaler, INPUTS, batch_size=3)


class Normaliser(mds.ModelHandler[list[float], dict[str, Any]]):
    """Subtracts the batch mean: a classic batch-dependence bug."""

    def infer(self, batch: Sequence[list[float]]) -> list[dict[str, Any]]:
        x = np.asarray(batch)
        centred = x - x.mean(axis=0)
        return [{"z": row, "n": len(batch)} for row in centred]


def test_batch_dependence_fails_with_a_readable_message() -> None:
    inputs = [[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]]
    with pytest.raises(AssertionError) as info:
        mds.testing.assert_batch_invariant(Normaliser, inputs, atol=1e-6)
    assert str(info.value).splitlines() == [
        "batched results differ from one-by-one results for 3 of 3 inputs "
        "(batch size 3, rtol=1e-05, atol=1e-06):",
        "  item 0: at ['z']: 2 of 2 values differ; worst at index (1,): "
        "batched -3.0 vs alone 0.0 (difference 3)",
        "  item 1: at ['z']: 1 of 2 values differ; worst at index (1,): "
        "batched -1.0 vs alone 0.0 (difference 1)",
        "  item 2: at ['z']: 2 of 2 values differ; worst at index (1,): "
        "batched 4.0 vs alone 0.0 (difference 4)",
    ]


def test_batch_invariance_compares_structures_and_failures() -> None:
    class Counter(mds.ModelHandler[int, Any]):
        def infer(self, batch: Sequence[int]) -> list[Any]:
            return [
                ValueError("two is unlucky in company")
                if x == 2 and len(batch) > 1
                else {"n": len(batch), "x": [x, "tag" if x != 3 else len(batch)]}
                for x in batch
            ]

    with pytest.raises(AssertionError) as info:
        mds.testing.assert_batch_invariant(Counter, [1, 2, 3], atol=0)
    assert str(info.value).splitlines()[1:] == [
        "  item 0: at ['n']: batched 3 vs alone 1",
        "  item 1: failed in a batch (InferenceError: model 'Counter' (version 1), instance 0: "
        "infer failed for this item: ValueError: two is unlucky in company) but not alone",
        "  item 2: at ['n']: batched 3 vs alone 1",
    ]


def test_torch_tensors_are_compared_as_arrays() -> None:
    torch = pytest.importorskip("torch")

    class Linear(mds.ModelHandler[list[float], Any]):
        def init(self, context: mds.ModelContext) -> None:
            torch.manual_seed(0)
            self.net = torch.nn.Linear(4, 3).eval()

        def preprocess(self, request: list[float]) -> Any:
            return torch.tensor(request)

        def infer(self, batch: Sequence[Any]) -> Any:
            with torch.inference_mode():
                return self.net(torch.stack(list(batch)))

    inputs = [[float(i), 1.0, -1.0, 0.5] for i in range(6)]
    mds.testing.assert_batch_invariant(Linear, inputs, atol=1e-6)
