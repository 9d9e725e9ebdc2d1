"""Redis Streams as a worker's source and sink; through redis-py.

A stream read by a consumer group is a queue with at-least-once delivery:
``XREADGROUP`` hands each entry to one consumer of the group, and the entry
stays in the group's pending entries list until ``XACK``. Redis has no
visibility timeout; a pending entry's idle time (since it was last delivered
or claimed) stands in for one. An entry idle for ``visibility`` seconds
belongs to a consumer that died, or that released it, and the next receive
of any consumer takes it over with ``XAUTOCLAIM``. So holding a message is
keeping its idle time low (``XCLAIM ... JUSTID``, the worker's heartbeat),
and releasing it with a delay is setting its idle time to
``visibility - delay``.

redis-py's client blocks, so every call runs in a worker thread (the event
loop, asyncio or trio, never waits on the network), each source's and sink's
in threads of its own. Pass your own
``redis.Redis`` client (for a host, a password, TLS), or let these make a
default one (``localhost:6379``).
"""

from __future__ import annotations

import heapq
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from .._deps import require
from .._errors import ConfigError
from .broker import Lane, Message

__all__ = ["RedisStreamSink", "RedisStreamSource"]

#: The most ``XAUTOCLAIM`` calls one receive makes while it looks for
#: entries to take over (each one scans up to ten times its count).
_SCANS = 8
#: The idle time after which entries are taken over, until a receive says.
_DEFAULT_VISIBILITY = 30.0
#: Threads for one source's or sink's calls at once.
_THREADS = 8

# Dead-letter the entry only if XACK found it pending, so that a message is
# dead-lettered once even if two consumers fail it, and never half (the
# entry added, the message still pending) if the worker dies in between.
_DEAD_LETTER = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 1 then
    return redis.call('XADD', KEYS[2], '*', 'body', ARGV[3], 'id', ARGV[2], 'error', ARGV[4])
end
return false
"""

# HSETNX and XADD in one step: a worker that died between them would leave a
# result in the hash that no redelivery ever adds to the stream.
_WRITE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
    redis.call('XADD', KEYS[2], '*', 'id', ARGV[1], 'result', ARGV[2])
    return 1
end
return 0
"""


def _client(client: Any) -> Any:
    if client is not None:
        return client
    redis = require("redis", feature="mds.workers' Redis Streams")
    return redis.Redis()


def _text(value: Any) -> str:
    """A reply's value as text: bytes from a default client, str from one that decodes."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _milliseconds(seconds: float) -> int:
    return max(0, round(seconds * 1000))


class RedisStreamSource:
    """A Redis stream a :class:`QueueWorker` receives from, as one consumer of a group.

    Each receive first takes over the entries that consumers have left idle
    for ``visibility`` seconds (a consumer that died, a message released for
    another delivery) with ``XAUTOCLAIM``, then reads new entries with
    ``XREADGROUP``. A message's body is the entry's ``body`` field (its
    other fields are the message's attributes); an entry without one is
    taken whole, as the JSON object of its fields. A message's id is its
    entry's id, the same on every delivery. Acknowledging is ``XACK``: the
    stream stays a log (trim it with ``XADD ... MAXLEN`` or ``XTRIM``).

    Redis cannot delay a redelivery: a release makes the entry look idle
    for ``visibility - delay`` seconds, so that a receive takes it over
    ``delay`` seconds later. A delay is therefore at most the ``visibility``
    of the last receive; give every worker of a group the same one.

    Args:
        stream: the stream's key.
        group: the consumer group the workers share.
        consumer: this consumer's name in the group; by default
            ``hostname-pid``, so that each process is a consumer of its own.
        dead_letters: the stream failed messages go to, as entries with
            fields ``body``, ``id`` (the entry's id in ``stream``) and
            ``error`` (the reason); by default ``{stream}:dead``.
        client: a ``redis.Redis`` client; by default ``redis.Redis()``.
        create: create the group (and the stream) on first use if it does
            not exist. A group made so reads the stream from its start, so
            that messages sent before the first worker started are served
            too; to start elsewhere, create the group yourself.

    Example:
        >>> source = mds.workers.RedisStreamSource("requests", client=redis.Redis(host="cache"))

    Added in 0.5.
    """

    def __init__(
        self,
        stream: str,
        *,
        group: str = "mds",
        consumer: str | None = None,
        dead_letters: str | None = None,
        client: Any = None,
        create: bool = True,
    ) -> None:
        self.name = stream
        self.stream = stream
        self.group = group
        if consumer is None:
            consumer = f"{socket.gethostname()}-{os.getpid()}"
        self.consumer = consumer
        self.dead_letters = dead_letters if dead_letters is not None else f"{stream}:dead"
        self.client = _client(client)
        self.create = create
        self._ready = False  # the group is known to exist
        # Entries idle this long are taken over: the last receive's visibility.
        self._visibility = _DEFAULT_VISIBILITY
        self._cursor = "0-0"  # where the next XAUTOCLAIM scan goes on from
        # When the messages this source released come due, in monotonic
        # seconds: Redis counts idle time in real time, whatever the loop's clock.
        self._due: list[float] = []
        self._due_lock = threading.Lock()
        self._dead_letter_script = self.client.register_script(_DEAD_LETTER)
        self._lane = Lane(_THREADS)

    def __repr__(self) -> str:
        return f"<mds.workers.RedisStreamSource {self.stream} {self.group}/{self.consumer}>"

    # -- the consumer group -------------------------------------------------

    def _ensure_group(self) -> None:
        if self._ready or not self.create:
            return
        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):  # it exists already (made by another consumer)
                raise
        self._ready = True

    def _explain(self, exc: Exception) -> Exception:
        """``exc``, or the error that says what to do when it is Redis' ``NOGROUP``."""
        if "NOGROUP" not in str(exc):
            return exc
        self._ready = False  # the stream was deleted: create the group again next time
        if self.create:
            return exc
        return ConfigError(
            f"stream {self.stream!r} has no consumer group {self.group!r}, and "
            "RedisStreamSource was made with create=False: create the group "
            f"(XGROUP CREATE {self.stream} {self.group} 0 MKSTREAM) or pass create=True"
        )

    async def check(self) -> None:
        """That the consumer group exists, or is created (``create=True``).

        Raises:
            ConfigError: there is no such group and ``create`` is false.
        """
        await self._lane.run(self._check)

    def _check(self) -> None:
        try:
            if self.create:
                self._ensure_group()
                return
            for group in self.client.xinfo_groups(self.stream):
                if _text(group.get("name")) == self.group:
                    return
            raise self._explain(RuntimeError("NOGROUP"))
        except Exception as exc:
            if "no such key" in str(exc).lower():  # XINFO on a stream that is not there
                raise self._explain(RuntimeError("NOGROUP")) from None
            raise

    # -- receiving ----------------------------------------------------------

    async def receive(self, limit: int, wait: float, visibility: float) -> Sequence[Message]:
        self._visibility = visibility
        return await self._lane.run(self._receive, max(1, limit), wait)

    def _receive(self, limit: int, wait: float) -> list[Message]:
        try:
            self._ensure_group()
            entries = self._reclaim(limit)
            if len(entries) < limit:
                # BLOCK 0 is forever: wait 1 ms at least; and with entries in
                # hand, not at all.
                block = None if entries else max(1, _milliseconds(self._block(wait)))
                reply = self.client.xreadgroup(
                    self.group,
                    self.consumer,
                    {self.stream: ">"},
                    count=limit - len(entries),
                    block=block,
                )
                entries.extend(_read_entries(reply))
            return self._messages(entries)
        except Exception as exc:
            error = self._explain(exc)
            if error is exc:
                raise
            raise error from exc

    def _block(self, wait: float) -> float:
        """How long to wait for new entries: ``wait``, or until a released message comes due."""
        with self._due_lock:
            due, now = self._due, time.monotonic()
            while due and due[0] <= now:
                heapq.heappop(due)
            return min(wait, due[0] - now) if due else wait

    def _reclaim(self, limit: int) -> list[tuple[Any, Any]]:
        """Take over entries idle for ``visibility``: their consumer died or released them."""
        found: list[tuple[Any, Any]] = []
        idle = _milliseconds(self._visibility)
        for _ in range(_SCANS):
            start = self._cursor
            reply = self.client.xautoclaim(
                self.stream, self.group, self.consumer, idle, start, count=limit - len(found)
            )
            self._cursor = _text(reply[0])
            found.extend(reply[1])
            if len(found) >= limit or (start == "0-0" and self._cursor == "0-0"):
                break
        gone = [entry_id for entry_id, fields in found if entry_id is not None and fields is None]
        if gone:  # deleted from the stream while pending (Redis 6.2): nothing to serve
            self.client.xack(self.stream, self.group, *gone)
        return [(entry_id, fields) for entry_id, fields in found if fields is not None]

    def _messages(self, entries: list[tuple[Any, Any]]) -> list[Message]:
        if not entries:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entry_id, _ in entries:
            pipe.xpending_range(self.stream, self.group, entry_id, entry_id, 1)
        # Each entry's real count: a fresh one is 1, one taken over more.
        counts = [int(found[0]["times_delivered"]) if found else 1 for found in pipe.execute()]
        return [
            _message(_text(entry_id), fields, deliveries)
            for (entry_id, fields), deliveries in zip(entries, counts, strict=True)
        ]

    # -- ending a delivery --------------------------------------------------

    async def acknowledge(self, message: Message) -> None:
        await self._lane.run(self.client.xack, self.stream, self.group, message.handle)

    async def acknowledge_many(self, messages: Sequence[Message]) -> list[BaseException | None]:
        """Acknowledge in one ``XACK`` (the worker gathers them): all or none fail."""
        handles = [message.handle for message in messages]
        await self._lane.run(self.client.xack, self.stream, self.group, *handles)
        return [None] * len(messages)

    async def release(self, message: Message, delay: float) -> None:
        # JUSTID: a release is no delivery (the XAUTOCLAIM that takes the
        # entry over counts one), so that max_deliveries counts attempts.
        idle = _milliseconds(max(0.0, self._visibility - delay))
        await self._lane.run(self._claim, [message.handle], idle)
        with self._due_lock:
            heapq.heappush(self._due, time.monotonic() + delay)

    async def extend(self, messages: Sequence[Message], seconds: float) -> None:
        # Claiming an entry resets its idle time: a receive takes it over only
        # ``visibility`` seconds (what ``seconds`` is) after this.
        handles = list(dict.fromkeys(message.handle for message in messages))
        if handles:
            await self._lane.run(self._claim, handles, None)

    def _claim(self, handles: list[Any], idle: int | None) -> None:
        self.client.xclaim(
            self.stream, self.group, self.consumer, 0, handles, idle=idle, justid=True
        )

    async def dead_letter(self, message: Message, reason: str) -> None:
        await self._lane.run(
            lambda: self._dead_letter_script(
                keys=[self.stream, self.dead_letters],
                args=[self.group, message.handle, message.body, reason],
            )
        )

    async def lag(self) -> int | None:
        """Entries of the stream the group has not read yet (Redis 7 on); ``None`` if unknown."""
        return await self._lane.run(self._lag)

    def _lag(self) -> int | None:
        self._ensure_group()
        for group in self.client.xinfo_groups(self.stream):
            if _text(group.get("name")) == self.group:
                lag = group.get("lag")  # None after deletions; absent before Redis 7
                return int(lag) if lag is not None else None
        return None


def _read_entries(reply: Any) -> list[tuple[Any, Any]]:
    """The entries of a one-stream ``XREADGROUP`` reply.

    RESP2 gives ``[[key, entries]]``, RESP3 ``{key: [entries]}``.
    """
    if not reply:
        return []
    if isinstance(reply, dict):
        lists = [value[0] for value in reply.values() if value]
    else:
        lists = [entries for _, entries in reply]
    return [(entry[0], entry[1]) for entries in lists for entry in entries or ()]


def _message(entry_id: str, fields: Any, deliveries: int) -> Message:
    named = {_text(name): value for name, value in dict(fields).items()}
    body = named.pop("body", None)
    if body is None:
        whole = {name: _text(value) for name, value in named.items()}
        return Message(
            id=entry_id, body=msgspec.json.encode(whole), deliveries=deliveries, handle=entry_id
        )
    return Message(
        id=entry_id,
        body=body if isinstance(body, bytes) else str(body).encode(),
        deliveries=deliveries,
        attributes={name: _text(value) for name, value in named.items()},
        handle=entry_id,
    )


class RedisStreamSink:
    """Each result as an entry of a Redis stream, added once per message.

    The result is kept in a hash, ``HSETNX {results} <message id> <result>``,
    and added to the stream, as an entry with fields ``id`` and ``result``,
    only if the hash did not hold it yet; both in one step (a script). So a
    message delivered again (its first worker died after writing, before
    acknowledging) adds no second entry downstream, and the hash answers
    "what was the result of message X". Neither is trimmed: delete what
    you have read from the hash, and trim the stream.

    Args:
        stream: the stream results are added to.
        client: a ``redis.Redis`` client; by default ``redis.Redis()``.
        results: the hash of results by message id; by default
            ``{stream}:results``.

    Example:
        >>> sink = mds.workers.RedisStreamSink("answers", client=redis.Redis(host="cache"))

    Added in 0.5.
    """

    def __init__(self, stream: str, *, client: Any = None, results: str | None = None) -> None:
        self.stream = stream
        self.results = results if results is not None else f"{stream}:results"
        self.client = _client(client)
        self._script = self.client.register_script(_WRITE)
        self._lane = Lane(_THREADS)

    def __repr__(self) -> str:
        return f"<mds.workers.RedisStreamSink {self.stream}>"

    async def write(self, message: Message, result: bytes) -> None:
        await self._lane.run(
            lambda: self._script(keys=[self.results, self.stream], args=[message.id, result])
        )

    async def write_many(
        self, items: Sequence[tuple[Message, bytes]]
    ) -> list[BaseException | None]:
        """Write in one round trip (the worker gathers them); each fails on its own."""

        def send() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for message, result in items:
                self._script(
                    keys=[self.results, self.stream], args=[message.id, result], client=pipe
                )
            return list(pipe.execute(raise_on_error=False))

        replies = await self._lane.run(send)
        return [reply if isinstance(reply, Exception) else None for reply in replies]
