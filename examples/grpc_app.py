"""One runtime served over HTTP (FastAPI) and gRPC at once, Triton-style.

Run it:   python examples/grpc_app.py      (HTTP on PORT=8000, gRPC on GRPC_PORT=8001)
Try it:   python examples/grpc_client.py 127.0.0.1:8001
          python examples/client.py http://127.0.0.1:8000
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from mlp_model import CONFIG, MLPClassifier, MLPRanked

import mds
import mds.fastapi
import mds.grpc

runtime = mds.Runtime()
runtime.add_model("mlp", MLPClassifier, CONFIG)
runtime.add_model("mlp-ranked", MLPRanked, CONFIG)  # streams: ModelStreamInfer over gRPC

GRPC_ADDRESS = f"127.0.0.1:{os.environ.get('GRPC_PORT', '8001')}"


@asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    # The gRPC server lives as long as the app, on its event loop. mds's
    # lifespan (from add_routes) has started the runtime already: the
    # server serves it and leaves it to the app to stop.
    async with mds.grpc.Server(runtime, GRPC_ADDRESS):
        yield


app = FastAPI(lifespan=lifespan)
mds.fastapi.add_routes(app, runtime)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
