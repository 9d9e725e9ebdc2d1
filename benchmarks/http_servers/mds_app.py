"""(a) mds in a FastAPI app: the adapter's route, the user's own routes, the mounted lean app."""

from __future__ import annotations

import gc
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from fastapi import FastAPI, Request, Response
from mds_mlp import CONFIG, MLP
from model import run_uvicorn

import mds
import mds.fastapi
import mds.server

runtime = mds.Runtime()
runtime.add_model("mlp", MLP, CONFIG)


@asynccontextmanager
async def frozen(app: FastAPI) -> AsyncIterator[None]:
    # As mds serve does once its models are loaded: the collector leaves what
    # startup made alone, so a full collection stalls no request for long.
    gc.collect()
    gc.freeze()
    yield


app = FastAPI(lifespan=frozen)
mds.fastapi.add_routes(app, runtime, load="wait")  # the app's lifespan runs after mds's
# (a3) mds's lean app (what `mds serve` runs) mounted in the same FastAPI app.
app.mount("/lean", mds.server.app(runtime))


@app.post("/predict")
async def predict(request: Request) -> Response:
    # The user's own route: raw body, msgspec, then mds.serve.
    body = msgspec.json.decode(await request.body())
    result = await mds.serve("mlp", body)
    return Response(msgspec.json.encode(result), media_type="application/json")


async def predict_plain(request: Request) -> Response:
    # The same route as a plain Starlette route: no dependency solving.
    body = msgspec.json.decode(await request.body())
    result = await mds.serve("mlp", body)
    return Response(msgspec.json.encode(result), media_type="application/json")


app.add_route("/predict-plain", predict_plain, methods=["POST"])


if __name__ == "__main__":
    run_uvicorn(app, int(sys.argv[1]))
