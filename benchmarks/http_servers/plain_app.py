"""(b) plain FastAPI: an async def route that calls the model per request."""

from __future__ import annotations

import sys

from fastapi import FastAPI
from model import make_model, run_batch, run_uvicorn
from pydantic import BaseModel

app = FastAPI()
model = make_model()


class Body(BaseModel):
    x: list[float]


@app.post("/predict")
async def predict(body: Body) -> dict[str, list[float]]:
    return {"y": run_batch(model, [body.x])[0]}


if __name__ == "__main__":
    run_uvicorn(app, int(sys.argv[1]))
