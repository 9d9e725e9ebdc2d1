"""The benchmark MLP over the Open Inference Protocol: HTTP (FastAPI) or gRPC, one per process.

python protocol_app.py http PORT    # mds.fastapi.add_routes on uvicorn (uvloop, httptools)
python protocol_app.py grpc PORT    # mds.grpc.Server
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import numpy as np
import torch
from model import MAX_BATCH, MAX_DELAY, make_model, run_uvicorn

import mds


class MLP(mds.ModelHandler[dict[str, Any], dict[str, Any]]):
    """Named tensors in and out: ``x`` (256 floats) -> ``y`` (16 floats)."""

    def init(self, context: mds.ModelContext) -> None:
        self.model = make_model()

    def signature(self) -> Any:
        spec = mds.TensorSpec
        return (
            {"x": spec(name="x", dtype="float32", shape=(256,))},
            {"y": spec(name="y", dtype="float32", shape=(16,))},
        )

    def warmup(self) -> list[dict[str, Any]]:
        return [{"x": np.zeros(256, dtype=np.float32)}]

    def infer(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with torch.inference_mode():
            y = self.model(torch.from_numpy(np.stack([r["x"] for r in batch]))).numpy()
        return [{"y": row} for row in y]


def make_runtime() -> mds.Runtime:
    runtime = mds.Runtime()
    runtime.add_model(
        "mlp",
        MLP,
        mds.ModelConfig(
            batching=mds.BatchingConfig(max_batch_size=MAX_BATCH, max_queue_delay=MAX_DELAY),
            warmup_batch_sizes=(1, MAX_BATCH),
        ),
    )
    return runtime


def serve_http(port: int) -> None:
    from fastapi import FastAPI

    import mds.fastapi

    app = FastAPI()
    mds.fastapi.add_routes(app, make_runtime(), load="wait")
    run_uvicorn(app, port)


async def serve_grpc(port: int) -> None:
    import mds.grpc

    async with mds.grpc.Server(make_runtime(), f"127.0.0.1:{port}"):
        await asyncio.Event().wait()  # until interrupted


if __name__ == "__main__":
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "http":
        serve_http(port)
    else:
        try:
            asyncio.run(serve_grpc(port))
        except KeyboardInterrupt:
            pass
