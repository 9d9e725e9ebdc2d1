"""What a worker exchanges with its broker: messages, sources and sinks.

A source (SQS, Redis Streams, your own) and a sink are protocols: a worker
needs nothing else of them.
"""

# No `from __future__ import annotations`: msgspec reads these annotations at
# run time, and mds/workers.py gives the classes the public module.

import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import anyio
import anyio.lowlevel
import msgspec

from .._errors import DecodeError
from .._status import WorkerHealth, WorkerState, WorkerStatistics
from .batched import Batched

T = TypeVar("T")

__all__ = [
    "Lane",
    "Message",
    "Rate",
    "Sink",
    "Source",
    "WorkerHealth",
    "WorkerState",
    "WorkerStatistics",
    "backoff_delay",
    "batched",
    "json_request",
    "json_result",
]


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """One message a source received.

    Attributes:
        id: the broker's id for the message: the same on every delivery, so
            results keyed by it are idempotent.
        body: the message's body, as received.
        deliveries: how many times it has been delivered, this one included.
        attributes: the broker's attributes of the message, as text.
        handle: what the source needs to acknowledge, release or extend it
            (an SQS receipt handle, a Redis stream entry id).

    Added in 0.5.
    """

    id: str
    body: bytes
    deliveries: int = 1
    attributes: Mapping[str, str] = msgspec.field(default_factory=dict)
    handle: Any = None


@runtime_checkable
class Source(Protocol):
    """A broker the worker receives messages from (:class:`mds.workers.SqsSource`, ...).

    Every method may block for network I/O: the worker calls them off the
    event loop only if they are async, so a source's methods are ``async``.

    Added in 0.5.
    """

    #: The queue's name, for statistics and logs.
    name: str

    async def receive(self, limit: int, wait: float, visibility: float) -> Sequence[Message]:
        """Up to ``limit`` messages, waiting up to ``wait`` seconds for the first.

        Each stays invisible to other consumers for ``visibility`` seconds.
        """
        ...

    async def acknowledge(self, message: Message) -> None:
        """The message is done: remove it from the queue."""
        ...

    async def release(self, message: Message, delay: float) -> None:
        """Deliver the message again, ``delay`` seconds from now (0: at once)."""
        ...

    async def extend(self, messages: Sequence[Message], seconds: float) -> None:
        """Keep the messages invisible to other consumers ``seconds`` from now."""
        ...

    async def dead_letter(self, message: Message, reason: str) -> None:
        """Move the message to the dead letters with ``reason``, and out of the queue."""
        ...

    async def lag(self) -> int | None:
        """Messages waiting in the queue, if the broker says; ``None`` if not."""
        ...

    # A source may also offer ``async def acknowledge_many(messages) -> list of
    # (exception or None)``: the worker then acknowledges in batches of ten;
    # and ``async def check()``, which the worker awaits when it starts: a
    # ConfigError there (no such queue, nowhere to dead-letter) stops it.


@runtime_checkable
class Sink(Protocol):
    """Where each result goes (:class:`mds.workers.SqsSink`, ``S3Sink``, ``CallbackSink``).

    ``write`` must be idempotent by ``message.id``: a message delivered
    twice (its first worker died after writing, before acknowledging)
    writes the same result under the same key.

    Added in 0.5.
    """

    async def write(self, message: Message, result: bytes) -> None:
        """Write the encoded result of ``message``."""
        ...

    # A sink may also offer ``async def write_many([(message, result), ...]) ->
    # list of (exception or None)``: the worker then writes in batches of ten;
    # and ``async def check()``, as a source may.


class Lane:
    """A limit of its own on the threads a source's or sink's blocking calls take.

    ``anyio.to_thread`` without a limiter shares one (40 threads) with
    everything else in the process: a sink whose writes hang, or a slow
    callback, would hold them all, and the heartbeat that keeps messages
    invisible would wait behind it. Each source and sink takes its calls
    through a lane of its own instead: ``most`` at once per event loop (a
    limiter wakes its waiters on their own loop only, so loops share none).
    """

    def __init__(self, most: int) -> None:
        self.most = most
        self._limiters: weakref.WeakKeyDictionary[Any, anyio.CapacityLimiter] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread; a cancelled caller waits for it (it cannot be stopped)."""
        loop = anyio.lowlevel.current_token().native_token  # the asyncio loop, trio's token
        with self._lock:
            limiter = self._limiters.get(loop)
            if limiter is None:
                limiter = self._limiters[loop] = anyio.CapacityLimiter(self.most)
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter, abandon_on_cancel=False)


class Rate:
    """Events per second over the last ``window`` seconds, counted in one-second buckets.

    Counted on the worker's loop, read from any thread (a scrape): a read
    may miss an event being counted, never more.
    """

    def __init__(self, window: int = 60) -> None:
        self.window = window
        self._counts = [0] * window
        self._seconds = [-1] * window  # the second each bucket counts
        self._since = time.monotonic()

    def add(self) -> None:
        second = int(time.monotonic())
        bucket = second % self.window
        if self._seconds[bucket] != second:
            self._seconds[bucket], self._counts[bucket] = second, 0
        self._counts[bucket] += 1

    def per_second(self) -> float:
        now = time.monotonic()
        second = int(now)
        recent = sum(
            count
            for count, when in zip(self._counts, self._seconds, strict=True)
            if 0 <= second - when < self.window
        )
        span = min(float(self.window), now - self._since)
        return recent / span if span > 0 else 0.0


# -- what the worker does by default ------------------------------------------


def json_request(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"the message body is not JSON: {exc}") from None


def _enc_hook(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    raise NotImplementedError(f"cannot encode {type(value).__name__} as JSON")


_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def json_result(message: Message, result: Any) -> bytes:
    return _encoder.encode({"id": message.id, "result": result})


def batched(owner: Any, many: str, one: Callable[[Any], Awaitable[None]]) -> Any:
    """``owner.<many>`` behind a :class:`Batched` if it has one, else ``one`` call by call."""
    send = getattr(owner, many, None)
    return Batched(send) if send is not None else one


def backoff_delay(backoff: tuple[float, float], deliveries: int) -> float:
    """Seconds before delivery ``deliveries + 1``: doubling from ``backoff[0]`` up to ``[1]``."""
    first, most = backoff
    return float(min(most, first * 2 ** min(max(0, deliveries - 1), 30)))
