"""Serve a torch model from your own FastAPI app, with ``await mds.serve``.

Run it:   python examples/fastapi_app.py          (PORT=8000 by default)
Try it:   curl -X POST localhost:8000/classify -H 'content-type: application/json' \
               -d "{\"features\": $(python -c 'print([0.5] * 16)')}"
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from mlp_model import CONFIG, MLPClassifier
from pydantic import BaseModel

import mds

runtime = mds.Runtime()
runtime.add_model("mlp", MLPClassifier, CONFIG)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with runtime:  # load and warm up before the first request; drain on shutdown
        yield


app = FastAPI(lifespan=lifespan)


class Features(BaseModel):
    features: list[float]


@app.post("/classify")
async def classify(body: Features) -> dict[str, Any]:
    try:
        return await mds.serve("mlp", body.features)
    except mds.RequestError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    except mds.Unavailable as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from None
    except mds.DeadlineExceeded as exc:
        raise HTTPException(status_code=504, detail=str(exc)) from None


@app.get("/health")
async def health() -> JSONResponse:
    report = await runtime.health()
    return JSONResponse({"ready": report.ready}, status_code=200 if report.ready else 503)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
