"""A FastAPI app with its own routes, plus the routes mds adds for every model.

Run it:   python examples/fastapi_app.py          (PORT=8000 by default)
Try it:   python examples/client.py http://127.0.0.1:8000
          curl -X POST localhost:8000/classify -H 'content-type: application/json' \
               -d "{\"features\": $(python -c 'print([0.5] * 16)')}"
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, Request
from mlp_model import CONFIG, MLPClassifier, MLPRanked
from pydantic import BaseModel

import mds
import mds.fastapi

runtime = mds.Runtime()
runtime.add_model("mlp", MLPClassifier, CONFIG)  # mds's JSON and the protocol, one model
runtime.add_model("mlp-ranked", MLPRanked, CONFIG)  # its postprocess yields: it streams

app = FastAPI()


@app.middleware("http")
async def served_by(request: Request, call_next: Any) -> Any:
    # The app's own middleware: it runs for mds's routes too.
    response = await call_next(request)
    response.headers["x-served-by"] = "fastapi-example"
    return response


class Features(BaseModel):
    features: list[float]


@app.post("/classify")
async def classify(body: Features) -> dict[str, Any]:
    # The app's own route, calling the model directly. mds's errors answer
    # for themselves: a bad request is a 400, a full queue a 429, ...
    return await mds.serve("mlp", body.features)


# Adds /health/*, /models/*, /statistics and the Open Inference Protocol's
# /v2/* for every model, and mds's error handlers for the app's own routes.
# The server takes connections at once; the models load in the background
# (readiness says when they are ready) and drain at shutdown.
mds.fastapi.add_routes(app, runtime)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
