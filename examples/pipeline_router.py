"""A router: forwards each request to a model by the request's type.

    python examples/pipeline_router.py

Requests say what they hold: ``{"type": "text", ...}`` goes to a text model,
``{"type": "numbers", ...}`` to a numeric one, and anything else to a
fallback function (the default branch). The router reads the value with a
path (``request.type``); a function ``(input, request) -> value`` works too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import mds


class WordCount(mds.ModelHandler[dict[str, Any], dict[str, Any]]):
    def infer(self, batch: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"words": len(item["text"].split())} for item in batch]


class Stats(mds.ModelHandler[dict[str, Any], dict[str, Any]]):
    def preprocess(self, request: dict[str, Any]) -> list[float]:
        values = [float(v) for v in request["values"]]
        if not values:
            raise mds.InvalidInput("'values' is empty")
        return values

    def infer(self, batch: Sequence[list[float]]) -> list[dict[str, Any]]:
        return [{"mean": sum(v) / len(v), "max": max(v)} for v in batch]


def unsupported(request: dict[str, Any]) -> dict[str, Any]:
    return {"error": f"no model for type {request.get('type')!r}"}


batching = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=16))
pipeline = mds.Pipeline(
    "analyse",
    [
        mds.Node.router(
            "by_type", "request.type", {"text": "text", "numbers": "numbers"}, default="fallback"
        ),
        mds.Node.model("text", WordCount, batching, next=None),
        mds.Node.model("numbers", Stats, batching, next=None),
        mds.Node.function("fallback", unsupported),
    ],
)


async def main() -> None:
    print(pipeline.to_text())
    runtime = mds.Runtime()
    runtime.add_pipeline(pipeline)
    async with runtime:
        requests = [
            {"type": "text", "text": "route me to the text model"},
            {"type": "numbers", "values": [3, 1, 4, 1, 5]},
            {"type": "image", "pixels": []},
        ]
        for request in requests:
            traced = await mds.serve("analyse", request, trace=True)
            print(f"{request['type']:8} -> {' -> '.join(traced.trace.path)}: {traced.value}")
        try:
            await mds.serve("analyse", {"type": "numbers", "values": []})
        except mds.InvalidInput as exc:
            print("bad input fails alone:", exc)


if __name__ == "__main__":
    asyncio.run(main())
