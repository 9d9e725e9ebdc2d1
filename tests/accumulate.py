"""A stateful model for the transport tests: per sequence, the running sum of 4-float rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

import mds

SPEC = mds.TensorSpec
STATEFUL = mds.ModelConfig(
    batching=mds.BatchingConfig(max_batch_size=8),
    sequences=mds.SequenceConfig(max_sequences=50),
)


class Accumulate(mds.ModelHandler[Any, Any]):
    """``total = x + the total the sequence's last step left`` (zeros at its start).

    Over the JSON route it takes a list of 4 numbers and answers ``{"total": [...]}``.
    """

    def signature(self) -> Any:
        return (
            {"x": SPEC(name="x", dtype="float32", shape=(4,))},
            {"total": SPEC(name="total", dtype="float32", shape=(4,))},
        )

    def from_tensors(self, tensors: dict[str, Any]) -> Any:
        return tensors["x"]

    def to_tensors(self, response: Any) -> dict[str, Any]:
        return {"total": np.asarray(response["total"], np.float32)}

    def preprocess(self, request: Any) -> np.ndarray:
        return np.asarray(request, np.float32).reshape(4)

    def sequence_start(self, sequence_id: int | str) -> np.ndarray:
        return np.zeros(4, np.float32)

    def infer(self, steps: Sequence[mds.SequenceStep[np.ndarray, np.ndarray]]) -> list[Any]:
        for step in steps:
            step.state = step.state + step.input
        return [step.state for step in steps]

    def postprocess(self, output: np.ndarray) -> dict[str, list[float]]:
        return {"total": output.tolist()}
