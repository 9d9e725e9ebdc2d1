"""A queue as a transport: receive messages, serve each through the runtime, write, acknowledge.

The worker adds no serving logic of its own: it decodes a message into the
handler's request, awaits ``runtime.serve`` (messages in flight at once
batch together in the model's batcher), writes the result to the sink and
acknowledges the message only then. What it owns is the message's life:

- it holds at most ``max_in_flight`` messages, and receives only as many as
  there are free places (backpressure from the batcher to the broker);
- it extends the visibility of every message it holds, queued or
  computing, so that none is redelivered while it is still being served;
- errors are routed by kind: a message that does not decode, or a request
  the model rejects, goes to the dead letters at once with the reason; a
  transient failure (overloaded, not ready, an inference error, a sink
  that failed) is released for another delivery after a backoff; a message
  delivered ``max_deliveries`` times goes to the dead letters. Nothing is
  retried forever, nothing is dropped; and what would send every message
  to the dead letters (a target the runtime does not have, a queue with no
  dead letters) stops the worker when it starts instead;
- stopping stops receiving, lets the messages in flight finish (for
  ``drain_timeout``), and releases the rest at once (visibility 0).
"""

# No `from __future__ import annotations`: msgspec reads these annotations at
# run time, and mds/workers.py gives the classes the public module.

import logging
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import anyio
import anyio.abc

from .._bridge import Home, LoopBound
from .._errors import (
    ConfigError,
    LifecycleError,
    MdsError,
    ModelNotFound,
    RequestError,
    describe,
    excerpt,
)
from .._runtime import Load, Runtime
from .broker import (
    Message,
    Rate,
    Sink,
    Source,
    WorkerHealth,
    WorkerState,
    WorkerStatistics,
    backoff_delay,
    batched,
    json_request,
    json_result,
)
from .checks import check

__all__ = [
    "Message",
    "QueueWorker",
    "Sink",
    "Source",
    "WorkerHealth",
    "WorkerState",
    "WorkerStatistics",
]

#: The states in which a worker takes messages.
_READY = (WorkerState.RECEIVING, WorkerState.FULL)
#: The states whose reason is a problem the worker waits out.
_TROUBLED = (WorkerState.WAITING, WorkerState.BACKING_OFF)
#: Seconds between looks at whether a target that is not ready is now.
_READY_POLL = 0.1

logger = logging.getLogger("mds.workers")


class QueueWorker(LoopBound):
    """Serve a queue's messages with a model or pipeline of a runtime.

    ``async with worker:`` starts the runtime if it is not running (and stops
    it after, draining), then receives until it is stopped; leaving (or
    :meth:`stop`) drains. :meth:`run` serves until cancelled. Sync code uses
    ``start_sync``/``stop_sync``, which run it in mds's background loop.
    While it runs, the runtime's health and statistics report it
    (``runtime.health().workers``, ``runtime.worker_statistics()``), and so
    do the adapters' ``/health/ready`` and ``mds.prometheus``.

    When it starts it checks what would otherwise fail every message: that
    the runtime serves ``target``, and what the source and sink can check
    (an SQS source that its queue exists and has dead letters to send to);
    each is a :class:`mds.ConfigError` that says what is wrong.

    Args:
        runtime: the runtime whose model or pipeline serves the messages.
        target: the model's or pipeline's name.
        source: the queue (:class:`SqsSource`, :class:`RedisStreamSource`).
        sink: where results go (:class:`SqsSink`, :class:`S3Sink`,
            :class:`RedisStreamSink`, :class:`CallbackSink`).
        decode: a message's request from its body; JSON by default. Raise
            :class:`mds.DecodeError` (or any error) for a body that makes
            none: the message goes to the dead letters.
        encode: the bytes written for a result; by default JSON
            ``{"id": message id, "result": result}``.
        max_in_flight: the most messages held at once (received and not
            yet acknowledged or released). Make it at least the model's
            ``max_batch_size`` so that full batches can form.
        visibility: seconds a received message stays invisible to other
            consumers; the worker extends it every ``heartbeat`` seconds
            while it holds the message.
        heartbeat: seconds between extensions; less than ``visibility``.
        max_deliveries: a message delivered this many times that fails
            again goes to the dead letters.
        backoff: ``(first, most)`` seconds before a released message is
            delivered again, doubling with each delivery.
        wait: seconds one receive waits for messages (long polling); a
            stop waits for the receive in progress, so at most this long.
        drain_timeout: seconds the messages in flight get to finish when
            the worker stops; the rest are released at once.
        timeout: each message's deadline in seconds (the model's by default).
        load: how the runtime starts, if the worker starts it.
        name: the worker's name in the runtime's health and statistics; the
            queue's name by default. Two workers on one runtime need two names.

    Raises:
        ConfigError: a setting is out of range (the message names it).

    Added in 0.5.
    """

    def __init__(
        self,
        runtime: Runtime,
        target: str,
        source: Source,
        sink: Sink,
        *,
        decode: Callable[[bytes], Any] = json_request,
        encode: Callable[[Message, Any], bytes] = json_result,
        max_in_flight: int = 64,
        visibility: float = 30.0,
        heartbeat: float = 10.0,
        max_deliveries: int = 5,
        backoff: tuple[float, float] = (1.0, 60.0),
        wait: float = 10.0,
        drain_timeout: float = 30.0,
        timeout: float | None = None,
        load: Load = "wait",
        name: str | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be 1 or more, not {max_in_flight}")
        if not 0 < heartbeat < visibility:
            raise ConfigError(
                f"heartbeat ({heartbeat} s) must be above 0 and below visibility "
                f"({visibility} s), or messages become visible while they are served"
            )
        if max_deliveries < 1:
            raise ConfigError(f"max_deliveries must be 1 or more, not {max_deliveries}")
        if len(backoff) != 2 or not 0 <= backoff[0] <= backoff[1]:
            raise ConfigError(
                f"backoff must be (first, most) seconds with 0 <= first <= most, not {backoff!r}"
            )
        if wait < 0 or drain_timeout < 0:
            raise ConfigError(
                f"wait ({wait} s) and drain_timeout ({drain_timeout} s) must not be negative"
            )
        self.name = name if name is not None else source.name
        self.runtime = runtime
        self.target = target
        self.source = source
        self.sink = sink
        self.decode = decode
        self.encode = encode
        self.max_in_flight = max_in_flight
        self.visibility = visibility
        self.heartbeat = heartbeat
        self.max_deliveries = max_deliveries
        self.backoff = backoff
        self.wait = wait
        self.drain_timeout = drain_timeout
        self.timeout = timeout
        self.load: Load = load
        self._home = Home(lambda: LifecycleError(f"{self!r} is not running"))
        self._state = WorkerState.CREATED
        self._held: dict[str, Message] = {}  # by id: queued or computing
        # Held, but being acknowledged, released or dead-lettered: not extended.
        self._ending: set[str] = set()
        # Deliveries of a message whose previous delivery is still ending, by id.
        self._returning: dict[str, Message] = {}
        self._serving: anyio.abc.TaskGroup | None = None
        self._round: anyio.Event | None = None  # a heartbeat's extension in flight
        self._stop_asked = False
        self._counts = dict.fromkeys(
            ("received", "completed", "released", "dead_lettered", "source_errors"), 0
        )
        self._lag: int | None = None
        self._problem: str | None = None  # the broker's last error, while backing off
        self._began = 0.0
        self._rate = Rate()  # completions per second, lately
        self._slots: anyio.Semaphore | None = None
        self._stopping: anyio.Event | None = None
        self._done: anyio.Event | None = None  # the receive loop has drained
        # Set when the last message held ends (the drain waits for it).
        self._emptied: anyio.Event | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self._started: Runtime | None = None

    def __repr__(self) -> str:
        where = f"{self.source.name} -> {self.target}"
        return f"<mds.workers.QueueWorker {self.name}: {where} {self.state.value}>"

    @property
    def state(self) -> WorkerState:
        """What the worker is doing now."""
        return self._state

    def health(self) -> WorkerHealth:
        """Whether the worker takes messages now, and why not."""
        state = self._state
        ready = state in _READY
        reason = None
        if not ready:
            # The broker's error, or what the target lacks: while it still holds.
            problem = self._problem if state in _TROUBLED else None
            reason = f"the worker is {state.value}" + (f": {problem}" if problem else "")
        return WorkerHealth(
            name=self.name,
            queue=self.source.name,
            target=self.target,
            state=state,
            ready=ready,
            reason=reason,
        )

    def statistics(self) -> WorkerStatistics:
        """The worker's counters now."""
        running = self._began and self._state is not WorkerState.STOPPED
        seconds = time.monotonic() - self._began if running else 0.0
        return WorkerStatistics(
            queue=self.source.name,
            target=self.target,
            state=self._state,
            in_flight=len(self._held),
            lag=self._lag,
            seconds=seconds,
            throughput=self._rate.per_second() if running else 0.0,
            name=self.name,
            **self._counts,
        )

    # -- lifecycle ----------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._tasks is not None:
            raise LifecycleError(f"{self!r} is already running")
        await self._home.open()
        runtime = self.runtime
        started = runtime.run(load=self.load) if not runtime.running else None
        entered = False
        try:
            if started is not None:
                await started.__aenter__()
                entered = True
            await check(runtime, self.target, (self.source, self.sink))
            runtime._attach(self.name, self)
        except BaseException as exc:
            self._stop_asked = False  # a stop asked of this start: the next one is new
            try:
                if entered:
                    assert started is not None
                    await started.__aexit__(type(exc), exc, exc.__traceback__)
            finally:
                await self._home.close()
            raise
        self._started = runtime if started is not None else None
        self._slots = anyio.Semaphore(self.max_in_flight)
        # Writes and acknowledgements, in batches where the sink and source take them.
        self._write = batched(self.sink, "write_many", lambda item: self.sink.write(*item))
        self._acknowledge = batched(self.source, "acknowledge_many", self.source.acknowledge)
        self._stopping = anyio.Event()
        self._done = anyio.Event()
        self._began = time.monotonic()
        self._rate = Rate()
        self._problem = None
        self._state = WorkerState.RECEIVING
        tasks = anyio.create_task_group()
        await tasks.__aenter__()
        self._tasks = tasks
        if self._stop_asked:  # stopped while the models loaded
            self._stopping.set()
        tasks.start_soon(self._receive)
        tasks.start_soon(self._extend)
        tasks.start_soon(self._measure_lag)
        logger.info("worker for %s started on queue %s", self.target, self.source.name)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks, self._tasks = self._tasks, None
        if tasks is None:
            return
        try:
            with anyio.CancelScope(shield=True):
                self._state = WorkerState.DRAINING
                assert self._stopping is not None and self._done is not None
                self._stopping.set()
                await self._done.wait()  # the receive loop drained (see _receive)
            tasks.cancel_scope.cancel()
            await tasks.__aexit__(None, None, None)
        finally:
            self._state = WorkerState.STOPPED
            self._stop_asked = False  # the next run is a new one
            self.runtime._detach(self.name, self)
            started, self._started = self._started, None
            try:
                if started is not None:
                    # Not in a scope of ours: the runtime exits its own scopes.
                    await started.__aexit__(exc_type, exc, tb)
            finally:
                await self._home.close()
            logger.info("worker for %s stopped: %s", self.target, self._counts)

    async def run(self) -> None:
        """Serve until cancelled or :meth:`stop` is called; then drain and stop."""
        async with self:
            assert self._stopping is not None
            await self._stopping.wait()

    def stop(self) -> None:
        """Ask a running worker to stop receiving and drain (what SIGTERM should call).

        Safe from any thread; :meth:`run` returns once it has drained.
        """
        self._stop_asked = True  # seen once started, if it is still starting
        stopping = self._stopping
        if stopping is None:
            return
        if self._home.thread is not None and self._home.portal is not None:
            try:
                self._home.portal.call(stopping.set)
                return
            except RuntimeError:  # called from the worker's own loop thread
                pass
        stopping.set()

    def start_sync(self) -> None:
        """Start in mds's background event loop; see :meth:`mds.Runtime.start_sync`."""
        super().start_sync()

    def stop_sync(self) -> None:
        """Stop what :meth:`start_sync` started: drain, then stop the runtime it started."""
        super().stop_sync()

    # -- receiving ----------------------------------------------------------

    async def _receive(self) -> None:
        """Receive while there are free places; serve each message in a task of its own.

        Stopping ends it: the receive in progress returns (within ``wait``),
        what it brought is released at once, the messages in flight get
        ``drain_timeout`` to finish, and the rest are released.
        """
        assert self._slots is not None and self._stopping is not None
        assert self._done is not None
        slots, stopping = self._slots, self._stopping
        failures = 0
        try:
            async with anyio.create_task_group() as serving:
                self._serving = serving
                while not stopping.is_set():
                    if not await self._target_ready():
                        break
                    free = await self._free_places(slots)
                    if not free:
                        break
                    self._become(WorkerState.RECEIVING)
                    try:
                        received = list(await self.source.receive(free, self.wait, self.visibility))
                        failures = 0
                        self._problem = None
                    except Exception as exc:
                        received = []
                        failures += 1
                        await self._back_off(exc, failures)
                    for _ in range(free - len(received)):
                        slots.release()
                    for message in received:
                        self._counts["received"] += 1
                        if message.id in self._held and message.id in self._ending:
                            # Delivered again while its last delivery ends (released
                            # at once, say): served once that one is done; keeps its place.
                            self._returning[message.id] = message
                        elif message.id in self._held:  # redelivered while still served
                            self._held[message.id] = message  # its newest handle
                            slots.release()
                        elif stopping.is_set():  # brought in while stopping: straight back
                            slots.release()
                            await self._release(message, 0.0, "the worker is stopping")
                        else:
                            self._held[message.id] = message
                            serving.start_soon(self._serve, message)
                    if slots.value == 0:
                        self._become(WorkerState.FULL)
                self._state = WorkerState.DRAINING
                with anyio.move_on_after(self.drain_timeout):
                    while self._held:
                        emptied = self._emptied = anyio.Event()
                        await emptied.wait()
                serving.cancel_scope.cancel()  # the rest release themselves (_serve)
        finally:
            self._done.set()

    def _become(self, state: WorkerState) -> None:
        """Say what the worker does now; once it stops, draining says it all."""
        stopping = self._stopping
        if stopping is None or not stopping.is_set():
            self._state = state

    async def _target_ready(self) -> bool:
        """Wait until the target takes requests (it loads, say); ``False``: stopping first.

        Received meanwhile, messages would only be released, and dead-lettered
        once delivered ``max_deliveries`` times, however long the model loads.
        """
        assert self._stopping is not None
        waited = False
        while not self._stopping.is_set():
            try:
                servable = self.runtime.servable(self.target)
                if servable.ready:
                    if waited:
                        self._problem = None
                    return True
                problem = f"{self.target!r} is not ready ({servable.state.value})"
            except ModelNotFound as exc:  # unloaded, for now
                problem = exc.message
            if not waited:
                logger.info("worker %s waits for %s", self.name, problem)
            waited, self._problem = True, problem
            self._become(WorkerState.WAITING)
            with anyio.move_on_after(_READY_POLL):
                await self._stopping.wait()
        return False

    async def _free_places(self, slots: anyio.Semaphore) -> int:
        """Wait for one free place at least; take every free one. 0: the worker is stopping."""
        assert self._stopping is not None
        stopping = self._stopping
        if slots.value == 0:
            self._become(WorkerState.FULL)
        acquired = False
        async with anyio.create_task_group() as waiting:

            async def until_stopped() -> None:
                await stopping.wait()
                waiting.cancel_scope.cancel()  # a full worker stops too

            waiting.start_soon(until_stopped)
            await slots.acquire()
            acquired = True
            waiting.cancel_scope.cancel()
        if not acquired:
            return 0
        free = 1
        while slots.value > 0:
            slots.acquire_nowait()
            free += 1
        return free

    async def _back_off(self, exc: Exception, failures: int) -> None:
        """The source failed: wait (doubling, up to ``backoff[1]``) before receiving again."""
        assert self._stopping is not None
        self._counts["source_errors"] += 1
        self._problem = f"receiving from {self.source.name} failed: {describe(exc)}"
        delay = backoff_delay(self.backoff, failures)
        logger.warning(
            "receiving from %s failed (%s); trying again in %.1f s",
            self.source.name,
            describe(exc),
            delay,
        )
        self._become(WorkerState.BACKING_OFF)
        with anyio.move_on_after(delay):
            await self._stopping.wait()

    async def _serve(self, message: Message) -> None:
        """One message: decode, serve, write, acknowledge; or route its error."""
        assert self._slots is not None
        try:
            try:
                request = self.decode(message.body)
            except Exception as exc:
                reason = exc.message if isinstance(exc, MdsError) else describe(exc)
                await self._dead_letter(message, f"the message does not decode: {reason}")
                return
            try:
                result = await self.runtime.serve(self.target, request, timeout=self.timeout)
            except ModelNotFound as exc:  # the worker's target, not the message: unloaded for now
                await self._retry(message, f"{type(exc).__name__}: {exc.message}")
                return
            except RequestError as exc:  # the message's fault: no delivery will fix it
                await self._dead_letter(message, f"{type(exc).__name__}: {exc.message}")
                return
            except MdsError as exc:  # transient: overloaded, not ready, inference, deadline
                await self._retry(message, f"{type(exc).__name__}: {exc.message}")
                return
            try:
                encoded = self.encode(message, result)
            except Exception as exc:  # no delivery would encode it
                await self._dead_letter(message, f"the result does not encode: {describe(exc)}")
                return
            try:
                await self._write((message, encoded))
            except Exception as exc:
                await self._retry(message, f"writing the result failed: {describe(exc)}")
                return
            self._ending.add(message.id)
            await self._after_heartbeat()
            try:
                await self._acknowledge(self._current(message))
            except Exception as exc:
                # Written but not acknowledged: it is delivered again, and the
                # sink writes the same result under the same id.
                self._counts["source_errors"] += 1
                logger.warning("acknowledging %s failed: %s", message.id, describe(exc))
            self._counts["completed"] += 1
            self._rate.add()
        except anyio.get_cancelled_exc_class():
            # The worker stopped before it was done: deliver it again at once.
            await self._release(message, 0.0, "the worker stopped before it was done")
            raise
        finally:
            self._ending.discard(message.id)
            if self._held.pop(message.id, None) is not None:
                self._slots.release()
            again = self._returning.pop(message.id, None)
            if again is not None:  # its next delivery, which kept a place of its own
                self._held[message.id] = again
                self._start(again)
            if not self._held and self._emptied is not None:
                self._emptied.set()

    def _start(self, message: Message) -> None:
        """Serve a delivery that waited for its previous one to end; or release it."""
        assert self._serving is not None and self._stopping is not None
        if self._stopping.is_set():
            self._held.pop(message.id, None)
            assert self._slots is not None
            self._slots.release()
            self._serving.start_soon(self._release, message, 0.0, "the worker is stopping")
        else:
            self._serving.start_soon(self._serve, message)

    def _current(self, message: Message) -> Message:
        """The message as last delivered (a redelivery brings a new handle)."""
        return self._held.get(message.id, message)

    async def _retry(self, message: Message, reason: str) -> None:
        message = self._current(message)  # its latest delivery's count
        if message.deliveries >= self.max_deliveries:
            await self._dead_letter(
                message, f"{reason} (delivered {message.deliveries} times, the most allowed)"
            )
            return
        await self._release(message, backoff_delay(self.backoff, message.deliveries), reason)

    async def _release(self, message: Message, delay: float, reason: str) -> None:
        if message.id in self._held:
            self._ending.add(message.id)  # the heartbeat must not hide it again
        logger.info("releasing %s for another delivery in %.1f s: %s", message.id, delay, reason)
        self._counts["released"] += 1
        try:
            with anyio.CancelScope(shield=True):
                await self._after_heartbeat()
                await self.source.release(self._current(message), delay)
        except Exception as exc:
            # It becomes visible again when its visibility runs out.
            self._counts["source_errors"] += 1
            logger.warning("releasing %s failed: %s", message.id, describe(exc))

    async def _dead_letter(self, message: Message, reason: str) -> None:
        self._ending.add(message.id)
        reason = excerpt(reason, 1000)
        logger.warning("dead-lettering %s: %s", message.id, reason)
        try:
            with anyio.CancelScope(shield=True):
                await self._after_heartbeat()
                await self.source.dead_letter(self._current(message), reason)
            self._counts["dead_lettered"] += 1
        except Exception as exc:
            # Not hidden for a whole visibility: it comes back after a backoff
            # and is dead-lettered then (or served, if it was a transient failure).
            self._counts["source_errors"] += 1
            delay = backoff_delay(self.backoff, self._current(message).deliveries)
            logger.error(
                "dead-lettering %s failed (%s); it comes back in %.1f s: see to the dead letters",
                message.id,
                describe(exc),
                delay,
            )
            await self._release(message, delay, "dead-lettering it failed")

    # -- keeping messages invisible -----------------------------------------

    async def _after_heartbeat(self) -> None:
        """Wait for an extension in flight: landing after a release, it would hide it again."""
        round_ = self._round
        if round_ is not None:
            await round_.wait()

    async def _extend(self) -> None:
        while True:
            await anyio.sleep(self.heartbeat)
            held = [m for i, m in self._held.items() if i not in self._ending]
            if not held:
                continue
            round_ = self._round = anyio.Event()
            try:
                await self.source.extend(held, self.visibility)
            except Exception as exc:
                self._counts["source_errors"] += 1
                logger.warning(
                    "extending the visibility of %d messages failed: %s", len(held), describe(exc)
                )
            finally:
                self._round = None
                round_.set()

    async def _measure_lag(self) -> None:
        while True:
            try:
                self._lag = await self.source.lag()
            except Exception:
                self._lag = None
            await anyio.sleep(max(self.heartbeat, 5.0))
