"""Quickstart: a handler, a runtime, and requests served through the lifecycle.

Run it: python examples/quickstart.py
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import numpy as np

import mds


class Polynomial(mds.ModelHandler[float, dict[str, float]]):
    """Evaluates a fitted polynomial: a tiny but real model, built in init."""

    def init(self, context: mds.ModelContext) -> None:
        # Load weights here; this "training" fits y = 3x^2 - 2x + 1 from samples.
        x = np.linspace(-1, 1, 50)
        self.coefficients = np.polyfit(x, 3 * x**2 - 2 * x + 1, deg=context.parameters["degree"])

    def warmup(self) -> list[float]:
        return [0.0, 0.5]  # run through the real path before the model is ready

    async def preprocess(self, request: float) -> float:
        if not isinstance(request, (int, float)):
            raise ValueError(f"expected a number, got {type(request).__name__}")
        return float(request)

    def infer(self, batch: Sequence[float]) -> np.ndarray:
        # One call per batch: a plain def runs in a worker thread, off the loop.
        return np.polyval(self.coefficients, np.asarray(batch))

    async def postprocess(self, output: np.floating) -> dict[str, float]:
        return {"y": round(float(output), 6)}


async def main() -> None:
    runtime = mds.Runtime()
    runtime.add_model(
        "poly",
        Polynomial,
        mds.ModelConfig(
            instances=2,
            batching=mds.BatchingConfig(max_batch_size=16),
            timeout=1.0,
            parameters={"degree": 2},
        ),
    )
    async with runtime:  # init and warm-up every instance, then ready
        print("health:", await runtime.health())
        print("one request:", await mds.serve("poly", 2.0))

        results: dict[float, dict[str, float]] = {}

        async def call(x: float) -> None:
            results[x] = await mds.serve("poly", x)

        async with anyio.create_task_group() as tasks:
            for i in range(100):
                tasks.start_soon(call, i / 10)
        print("100 concurrent requests, e.g. f(9.9) =", results[9.9])

        try:
            await mds.serve("poly", "two")
        except mds.InvalidInput as exc:
            print("a bad request fails alone:", exc)

        stats = runtime.statistics()["poly"]
        print(f"completed {stats.completed}, failed {stats.failed}", end=", ")
        print(f"mean batch size {stats.mean_batch_size:.1f}")
    print("state after stop:", runtime.models["poly"].state.value)


if __name__ == "__main__":
    anyio.run(main)
