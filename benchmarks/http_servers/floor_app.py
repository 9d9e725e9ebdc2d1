"""(f) The floor of any route over mds: a bare ASGI app awaiting runtime.serve, nothing else.

No router, no headers read, no deadline or priority, no disconnect watch,
no error table: the body decoded with msgspec, served, encoded. What `mds
serve` costs beyond this is its HTTP layer; what this costs beyond the
model is uvicorn, the event loop and mds's batcher.
"""

from __future__ import annotations

import gc
import sys
from typing import Any

import msgspec
from mds_mlp import CONFIG, MLP
from model import run_uvicorn

import mds

runtime = mds.Runtime()
runtime.add_model("mlp", MLP, CONFIG)
HEADERS = [(b"content-type", b"application/json")]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()  # startup
        async with runtime.run(load="wait"):
            gc.collect()
            gc.freeze()  # as mds serve does once its models are loaded
            await send({"type": "lifespan.startup.complete"})
            await receive()  # shutdown
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    reply = msgspec.json.encode(await runtime.serve("mlp", msgspec.json.decode(body)))
    length = (b"content-length", str(len(reply)).encode())
    await send({"type": "http.response.start", "status": 200, "headers": [*HEADERS, length]})
    await send({"type": "http.response.body", "body": reply})


if __name__ == "__main__":
    run_uvicorn(app, int(sys.argv[1]))
