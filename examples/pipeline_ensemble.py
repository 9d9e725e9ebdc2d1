"""An ensemble: two models run at once on the same input, their outputs joined.

    python examples/pipeline_ensemble.py

Two small torch regressors (trained in ``init`` on the same data, from
different seeds and widths) each see every request; a fan-out runs them
concurrently and ``join`` averages their predictions. Each model keeps its
own batcher and instances.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import mds


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """y = sin(x0) + x1^2 / 2, on 512 points."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, size=(512, 2)).astype(np.float32)
    y = np.sin(x[:, 0]) + x[:, 1] ** 2 / 2
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))


class Regressor(mds.ModelHandler[list[float], float]):
    collator = mds.Stack()

    def __init__(self, seed: int, width: int) -> None:
        self.seed, self.width = seed, width

    def init(self, context: mds.ModelContext) -> None:
        torch.manual_seed(self.seed)
        torch.set_num_threads(context.threads or 1)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, self.width), torch.nn.Tanh(), torch.nn.Linear(self.width, 1)
        )
        x, y = data()
        optimiser = torch.optim.Adam(self.net.parameters(), lr=0.02)
        for _ in range(300):
            optimiser.zero_grad()
            torch.nn.functional.mse_loss(self.net(x)[:, 0], y).backward()
            optimiser.step()
        self.net.eval()

    def preprocess(self, request: list[float]) -> np.ndarray:
        return np.asarray(request, dtype=np.float32).reshape(2)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.net(torch.from_numpy(batch))[:, 0].numpy()

    def split(self, outputs: np.ndarray, batch: Any) -> Sequence[float]:
        return [float(v) for v in outputs]


def average(outputs: dict[str, float]) -> dict[str, Any]:
    return {"prediction": sum(outputs.values()) / len(outputs), "members": outputs}


batching = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=32))
pipeline = mds.Pipeline(
    "ensemble",
    [
        mds.Node.fan_out("members", ["narrow", "wide"], join=average),
        mds.Node.model("narrow", lambda: Regressor(seed=1, width=16), batching),
        mds.Node.model("wide", lambda: Regressor(seed=2, width=64), batching),
    ],
)


async def main() -> None:
    print(pipeline.to_text())
    runtime = mds.Runtime()
    runtime.add_pipeline(pipeline)
    async with runtime:
        point = [0.5, -1.0]
        result = await mds.serve("ensemble", point)
        truth = float(np.sin(0.5) + 0.5)
        members = ", ".join(f"{k} {v:.3f}" for k, v in result["members"].items())
        print(f"f{point}: ensemble {result['prediction']:.3f} ({members}); truth {truth:.3f}")

        traced = await mds.serve("ensemble", point, trace=True)
        (fan_out,) = traced.trace.nodes
        for branch in fan_out.branches:
            print(f"  branch {branch.node}: started at +{branch.started * 1e3:.2f} ms")

        rng = np.random.default_rng(1)
        points = rng.uniform(-2, 2, size=(300, 2)).tolist()
        results = await asyncio.gather(*(mds.serve("ensemble", p) for p in points))
        errors = [
            abs(r["prediction"] - (np.sin(p[0]) + p[1] ** 2 / 2))
            for r, p in zip(results, points, strict=True)
        ]
        print(f"{len(results)} concurrent requests, mean abs error {np.mean(errors):.3f}")
        for name, model in runtime.models.items():
            print(f"  {name}: mean batch {model.statistics().mean_batch_size:.1f}")


if __name__ == "__main__":
    asyncio.run(main())
