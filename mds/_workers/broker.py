"""What a worker exchanges with its broker: messages, sources, sinks; and its state.

A source (SQS, Redis Streams, your own) and a sink are protocols: a worker
needs nothing else of them.
"""

# No `from __future__ import annotations`: msgspec reads these annotations at
# run time, and mds/workers.py gives the classes the public module.

import enum
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import msgspec

__all__ = ["Message", "Sink", "Source", "WorkerState", "WorkerStatistics"]


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
    # (exception or None)``: the worker then acknowledges in batches of ten.


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
    # list of (exception or None)``: the worker then writes in batches of ten.


class WorkerState(enum.Enum):
    """What a worker is doing.

    Added in 0.5.
    """

    CREATED = "created"
    RECEIVING = "receiving"
    FULL = "full"  # holding max_in_flight messages: not receiving until one ends
    BACKING_OFF = "backing_off"  # the source failed: waiting before receiving again
    DRAINING = "draining"
    STOPPED = "stopped"


class WorkerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's counters since it started.

    Attributes:
        queue: the source's name.
        target: the model or pipeline it serves.
        state: what it is doing now.
        received: messages received (redeliveries included).
        completed: messages served, written and acknowledged.
        released: messages released for another delivery (a transient
            failure, or the worker stopping).
        dead_lettered: messages moved to the dead letters.
        in_flight: messages held now (queued or computing).
        source_errors: receives, acknowledgements and extensions that failed.
        lag: messages waiting in the queue, when last asked (``None``: unknown).
        seconds: how long it has been running.
        throughput: messages completed per second over that time.

    Added in 0.5.
    """

    queue: str
    target: str
    state: WorkerState
    received: int = 0
    completed: int = 0
    released: int = 0
    dead_lettered: int = 0
    in_flight: int = 0
    source_errors: int = 0
    lag: int | None = None
    seconds: float = 0.0
    throughput: float = 0.0
