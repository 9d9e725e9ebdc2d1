"""Raw ASGI for the routes: the types, sending a reply, and watching for a client that leaves.

The adapters' routes are plain ASGI endpoints (no framework request object
per call); these are what they share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio

from .. import _loop
from .service import Reply

__all__ = [
    "GONE",
    "ClientGone",
    "Failed",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "send_reply",
    "watching",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


GONE = object()  # the client disconnected


class ClientGone(Exception):
    """The client disconnected before it sent the whole body."""


class Failed:
    """What the work raised, handed back rather than raised."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


#: Seconds a request runs before its client is watched for a disconnect. A
#: task per request that waits on ``receive`` cost more than the rest of the
#: route (benchmarks/transports.py); a request answered sooner never needs it.
WATCH_AFTER = 0.05


async def watching(receive: Receive, work: Awaitable[Any], *, at_once: bool = False) -> Any:
    """``await work``, cancelled if the client disconnects meanwhile.

    Returns its result, a :class:`Failed` with what it raised, or
    ``GONE`` when the client left. The client is watched once ``work``
    has run for :data:`WATCH_AFTER` seconds (``at_once``: from the start):
    one that leaves sooner has its request computed all the same.
    """
    loop = _loop.asyncio_loop()
    if loop is None:
        return await _watching_anyio(receive, work)
    # asyncio: a task waits for the disconnect and cancels ours; a task
    # group would cost several times as much on this per-request path.
    task = asyncio.current_task()
    assert task is not None
    gone = finished = False
    watcher: asyncio.Future[Message] | None = None

    def on_message(waiting: asyncio.Future[Message]) -> None:
        nonlocal gone
        # finished: scheduled in the loop pass the work ended in, too late to cancel it.
        if not finished and not waiting.cancelled() and waiting.exception() is None:
            if waiting.result()["type"] == "http.disconnect":
                gone = True
                task.cancel()

    def watch() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(on_message)

    timer = None
    if at_once:
        watch()
    else:
        timer = loop.call_later(WATCH_AFTER, watch)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            return GONE
        raise
    except Exception as exc:
        return Failed(exc)
    finally:
        finished = True
        if timer is not None:
            timer.cancel()
        if watcher is not None:
            watcher.remove_done_callback(on_message)
            watcher.cancel()


async def _watching_anyio(receive: Receive, work: Awaitable[Any]) -> Any:
    outcome: Any = GONE
    async with anyio.create_task_group() as tasks:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tasks.cancel_scope.cancel()

        tasks.start_soon(watch)
        try:
            outcome = await work
        except Exception as exc:
            outcome = Failed(exc)
        tasks.cancel_scope.cancel()
    return outcome


async def send_reply(send: Send, reply: Reply) -> None:
    headers = [
        (b"content-type", reply.content_type.encode("latin-1")),
        (b"content-length", str(len(reply.body)).encode("latin-1")),
    ]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})
