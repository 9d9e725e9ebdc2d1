"""The ready-made backends: one model served by PyTorch and by ONNX Runtime.

A small classifier is trained for a moment, saved as a state dict and
exported to ONNX; ``mds.TorchHandler`` and ``mds.OnnxHandler`` then serve the
two files with batching. No handler code is needed for either.

    pip install "torch==2.13.0" ".[torch,onnx]"
    python examples/backends.py
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import anyio
import numpy as np
import torch

import mds


def make_classifier() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))


def train_and_save(folder: Path) -> tuple[Path, Path]:
    """Learn which side of the line y = x a point is on; save both formats."""
    torch.manual_seed(0)
    model = make_classifier()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    points = torch.rand(512, 2)
    labels = (points[:, 1] > points[:, 0]).long()
    for _ in range(200):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(points), labels).backward()
        optimiser.step()
    weights = folder / "classifier.pt"
    torch.save(model.state_dict(), weights)
    exported = folder / "classifier.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notes
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, 2),),
            str(exported),
            input_names=["point"],
            output_names=["logits"],
            dynamic_axes={"point": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    return weights, exported


BATCHING = mds.BatchingConfig(max_batch_size=32, max_queue_delay=0.002)
EXAMPLE = np.array([0.5, 0.5], np.float32)


async def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        weights, exported = await anyio.to_thread.run_sync(train_and_save, Path(folder))
        runtime = mds.Runtime()
        runtime.add_model(
            "torch",
            mds.TorchHandler(make_classifier, weights=weights, examples=[EXAMPLE]),
            mds.ModelConfig(batching=BATCHING),
        )
        runtime.add_model(
            "onnx",
            mds.OnnxHandler(exported, examples=[EXAMPLE]),
            mds.ModelConfig(batching=BATCHING),
        )
        async with runtime:
            points = np.random.default_rng(1).random((256, 2), dtype=np.float32)
            results: dict[str, list[np.ndarray]] = {"torch": [], "onnx": []}

            async def classify(name: str, point: np.ndarray) -> None:
                results[name].append(await mds.serve(name, point))

            for name in results:
                async with anyio.create_task_group() as tasks:
                    for point in points:
                        tasks.start_soon(classify, name, point)
                stats = runtime.model(name).statistics()
                print(f"{name}: {stats.completed} points in {stats.batches} batches")

            point = np.array([0.2, 0.9], np.float32)
            by_torch, by_onnx = await mds.serve("torch", point), await mds.serve("onnx", point)
            side = "above" if by_torch.argmax() == 1 else "below"
            agree = np.allclose(by_torch, by_onnx, atol=1e-5)
            print(f"(0.2, 0.9) is {side} the line; torch and onnx agree: {agree}")
            try:
                await mds.serve("onnx", np.array([0.2, 0.9, 0.1], np.float32))
            except mds.InvalidInput as exc:
                print(f"a bad request fails alone: {exc}")
            stats = runtime.model("onnx").statistics()
            print(f"onnx: {stats.completed} completed, {stats.failed} failed")


if __name__ == "__main__":
    anyio.run(main)
