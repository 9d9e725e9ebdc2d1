"""Test a handler the way a notebook would: no server, no event loop to manage.

Run it: python examples/testing_a_handler.py   (works the same in a Jupyter cell)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

import mds
import mds.testing


class Standardiser(mds.ModelHandler[list[float], list[float]]):
    """Scales features with statistics fixed at init: batch-invariant."""

    def init(self, context: mds.ModelContext) -> None:
        self.mean = np.array([1.0, 10.0])
        self.scale = np.array([2.0, 5.0])

    def warmup(self) -> list[list[float]]:
        return [[1.0, 10.0]]

    def preprocess(self, request: list[float]) -> np.ndarray:
        if len(request) != 2:
            raise ValueError(f"expected 2 features, got {len(request)}")
        return np.asarray(request, dtype=np.float64)

    def infer(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        return (np.stack(batch) - self.mean) / self.scale

    def postprocess(self, output: np.ndarray) -> list[float]:
        return [round(float(v), 4) for v in output]


class LeakyStandardiser(Standardiser):
    """A common bug: statistics from the batch itself, so results depend on batch-mates."""

    def infer(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        x = np.stack(batch)
        return (x - x.mean(axis=0)) / (x.std(axis=0) + 1.0)


inputs = [[1.0, 10.0], [3.0, 15.0], [0.5], [-1.0, 5.0], [2.0, 12.5]]

# 1. The whole lifecycle on some inputs: outputs, per-input errors, timings.
report = mds.testing.run_lifecycle(Standardiser, inputs, batch_size=2)
print("states:", " -> ".join(state.value for state in report.states))
print("batch sizes:", report.batch_sizes)
for request, output, error in zip(inputs, report.outputs, report.errors, strict=True):
    print(f"  {request} -> {output if error is None else f'{type(error).__name__}: {error}'}")
print("seconds per step:", {step: round(s, 5) for step, s in report.timings.items()})

# 2. Batched results equal one-by-one results, or a readable failure.
good = [request for request in inputs if len(request) == 2]
mds.testing.assert_batch_invariant(Standardiser, good)
print("Standardiser: batch-invariant")
try:
    mds.testing.assert_batch_invariant(LeakyStandardiser, good)
except AssertionError as exc:
    print("LeakyStandardiser:", exc)
