"""Handlers for the batch-serving tests (imported by the tests and by ``mds batch``)."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

import mds


class Scorer(mds.ModelHandler[dict[str, Any], dict[str, Any]]):
    """``{"x": number}`` -> ``{"y": 2x, "label": ...}``; planted failures by value.

    ``x`` that is not a number is bad input; ``x == 13`` fails in
    postprocess (a poisoned row). With the parameter ``jitter``, each batch
    takes a random time, so rows finish out of order.
    """

    def init(self, context: mds.ModelContext) -> None:
        self.jitter = float(context.parameters.get("jitter", 0.0))
        self.flaky = context.parameters.get("flaky")  # a file: while it exists, x == 7 fails
        self.rng = random.Random(0)

    async def preprocess(self, request: dict[str, Any]) -> float:
        x = request.get("x") if isinstance(request, dict) else None
        if isinstance(x, bool) or not isinstance(x, int | float):
            raise mds.InvalidInput(f"'x' must be a number, got {x!r}")
        return float(x)

    async def infer(self, batch: Sequence[float]) -> list[float]:
        if self.jitter:
            await anyio.sleep(self.rng.random() * self.jitter)
        return [2.0 * x for x in batch]

    def postprocess(self, y: float) -> dict[str, Any]:  # plain: it may read a file
        if y == 26.0:
            raise ValueError("poisoned row")
        if y == 14.0 and self.flaky and Path(self.flaky).exists():
            raise ValueError("flaky row")
        return {"y": y, "label": "big" if y > 100 else "small"}


class SlowScorer(Scorer):
    """A Scorer whose batches take 20 ms: a job over a few thousand rows lasts seconds."""

    def init(self, context: mds.ModelContext) -> None:
        super().init(context)
        self.delay = float(os.environ.get("SCORER_DELAY", "0.02"))

    def infer(self, batch: Sequence[float]) -> list[float]:  # type: ignore[override]
        time.sleep(self.delay)
        return [2.0 * x for x in batch]


CONFIG = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=16, max_queue_delay=0.001))


class Projector(mds.ModelHandler[Any, Any]):
    """Named tensors in and out: ``features`` (float32, 4) -> ``scores`` (float32, 2), ``top``."""

    def init(self, context: mds.ModelContext) -> None:
        import numpy as np

        self.np = np
        self.weights = np.arange(8, dtype=np.float32).reshape(4, 2)

    def signature(self) -> Any:
        spec = mds.TensorSpec
        return (
            {"features": spec(name="features", dtype="float32", shape=(4,))},
            {
                "scores": spec(name="scores", dtype="float32", shape=(2,)),
                "top": spec(name="top", dtype="int64", shape=()),
            },
        )

    def infer(self, batch: Sequence[Any]) -> Any:
        features = self.np.stack([item["features"] for item in batch])
        return features @ self.weights

    def to_tensors(self, response: Any) -> Any:
        return {"scores": response, "top": int(response.argmax())}
