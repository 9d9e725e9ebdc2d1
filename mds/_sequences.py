"""Stateful models: sequences of requests that share state, batched across sequences.

A stateful model's request is one step of a sequence, named by the id and
the start and end flags in its :class:`~mds.RequestContext`. The sequencer
stands between the model's request path and its batcher, and keeps at most
one step of each sequence in the batcher: so a batch holds at most one step
of a sequence, a sequence's steps run in the order they came, and the steps
of many sequences batch together (Triton's "oldest" strategy). The next step
of a sequence waits its turn beside the batcher; the batcher says when a
step has left it for good (computed, expired, or given up by its caller).

The handler's ``infer`` gets :class:`SequenceStep` objects, each holding the
state its sequence's last step left, and sets the new one on it; a step that
fails leaves the state as it was. ``sequence_start`` runs with a sequence's
first batch, on the instance computing it; ``sequence_end`` runs on that
instance whatever ends the sequence, so no state is left behind.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from . import _loop
from ._config import SequenceConfig
from ._errors import DeadlineExceeded, InvalidInput, MdsError, NotReady, Overloaded, describe
from ._request import _current
from ._stateful import SequenceEnd, SequenceId, SequenceStep, _Live

if TYPE_CHECKING:
    from ._batching.batcher import Batcher
    from ._batching.queue import Item
    from ._instance import Instance
    from ._statistics import RequestCounts

__all__ = ["Sequences"]

logger = logging.getLogger("mds.model")

#: How many ended sequences are remembered, to say why a late step's sequence is gone.
_REMEMBERED = 1024

#: Why sequences ended lately, and on which version, by id: shared by a model's
#: versions, so that a step that reaches another version than the one that
#: ended its sequence is told why.
Ends = OrderedDict[SequenceId, tuple[SequenceEnd, str]]


class Sequences:
    """A stateful model's live sequences, between its request path and its batchers.

    Args:
        config: the model's sequence settings.
        batchers: the model's batcher; with ``pinned``, one per instance, in order.
        instances: the model's instances.
        tasks: where end hooks run while the model runs.
        counts: the model's counters (sequences started and ended).
        where: the model, for logs.
        ended: the record of why sequences ended to keep, shared by the
            model's versions (a record of its own if ``None``).
    """

    def __init__(
        self,
        config: SequenceConfig,
        batchers: Sequence[Batcher[Any]],
        instances: Sequence[Instance],
        tasks: anyio.abc.TaskGroup,
        counts: RequestCounts,
        where: str,
        ended: Ends | None = None,
    ) -> None:
        self.config = config
        self.batchers = tuple(batchers)
        self._instances = instances
        self._tasks: anyio.abc.TaskGroup | None = tasks
        self._counts = counts
        self._where = where
        self._clock = _loop.clock()
        self._new_waiter = _loop.waiter_factory()
        # Live sequences, least recently active first (for the idle watch).
        self._live: OrderedDict[SequenceId, _Live] = OrderedDict()
        # Ids whose end hook is running, and the sequences started again meanwhile.
        self._ending: dict[SequenceId, list[_Live]] = {}
        self._ended: Ends = ended if ended is not None else OrderedDict()
        self._version = self.batchers[0].version  # what this table's ends are recorded as
        self._due: dict[_Live, SequenceEnd] = {}  # ended, their sequence_end not yet begun
        self._pins = [0] * len(instances)
        self._until = math.inf  # when the idle watch wakes next
        self._wake = anyio.Event()
        self._empty: anyio.Event | None = None  # set when the last live sequence ends
        #: Set once the model stops taking new sequences.
        self.closing: SequenceEnd | None = None
        #: Whether the stop to come is a swap (a reload replaced the model).
        self.swapped = False
        for batcher in self.batchers:
            batcher.queue.finished = self.finished
        tasks.start_soon(self.watch_idle)

    @property
    def live(self) -> int:
        """How many sequences are live."""
        return len(self._live)

    def holds(self, sequence_id: SequenceId) -> bool:
        """Whether ``sequence_id`` is live here (and may take its next step)."""
        return sequence_id in self._live

    # -- a step's way in ------------------------------------------------------

    def admit(self) -> SequenceStep[Any, Any]:
        """Take the request being served as the next step of its sequence.

        Called before ``preprocess``, with no await before it, so that steps
        keep the order they came in (a gRPC stream's, say). The step then
        goes through :meth:`enqueue`, or :meth:`release` if it fails first.

        Raises:
            InvalidInput: no sequence id; a start for a live sequence; a step
                for one that is not live, or after its last step.
            Overloaded: too many live sequences, or steps waiting in this one.
            NotReady: a start while the model stops.
        """
        context = _current.get()
        sequence_id = context.sequence_id
        if sequence_id is None:
            raise InvalidInput(
                "the model is stateful: each request is a step of a sequence; give its "
                "sequence_id, with sequence_start on the first step"
            )
        live = self._live.get(sequence_id)
        if context.sequence_start:
            if live is not None:
                raise InvalidInput(
                    f"sequence {sequence_id!r} is already live: send its next step without "
                    "sequence_start, or end it (sequence_end) before starting it again"
                )
            live = self._open(sequence_id)
        elif live is None:
            raise InvalidInput(self._not_live(sequence_id))
        elif live.closed:
            raise InvalidInput(
                f"sequence {sequence_id!r} has had its last step (sequence_end) or is "
                "ending; start a new sequence"
            )
        elif len(live.pending) >= self.config.max_queued_steps:
            raise Overloaded(
                f"sequence {sequence_id!r} has {len(live.pending)} steps waiting behind the "
                f"one being computed (max_queued_steps); wait for their answers"
            )
        step: SequenceStep[Any, Any] = SequenceStep(
            sequence_id, None, start=context.sequence_start, end=context.sequence_end, live=live
        )
        step._owner = self
        if step.end:
            live.closed = True
        if live.busy:
            step._turn = self._new_waiter()
            live.pending.append(step._turn)
        else:
            live.busy = True
        return step

    async def enqueue(
        self,
        step: SequenceStep[Any, Any],
        value: Any,
        deadline: float | None,
        priority: int | None,
        cost: int,
        key: Any,
        length: int | None,
    ) -> Item:
        """Queue ``step`` with its preprocessed ``value``, once it is the sequence's turn.

        Raises:
            DeadlineExceeded: the deadline passed while it waited its turn.
            MdsError: what the batcher's ``enqueue`` raises.
        """
        step.input = value
        turn = step._turn
        if turn is not None:
            when = math.inf if deadline is None else deadline
            with _loop.move_on_at(when, self._clock()) as scope:
                outcome = await turn  # at once if it was given the turn (or its sequence ended)
            if scope.cancelled_caught:
                error = DeadlineExceeded(
                    "the request's deadline passed while it waited behind the earlier steps "
                    f"of sequence {step.sequence_id!r}; it was not computed"
                )
                self.release(step, error)
                raise error
            if isinstance(outcome, BaseException):
                step._released = True  # the sequence ended under it: nothing to release
                raise outcome
        step._turn = None
        return self.put(step, value, deadline, priority, cost, key, length)

    def put(
        self,
        step: SequenceStep[Any, Any],
        value: Any,
        deadline: float | None,
        priority: int | None,
        cost: int,
        key: Any,
        length: int | None,
    ) -> Item:
        """:meth:`enqueue` for a step that has the turn (no waiting): no coroutine."""
        step.input = value
        live = step._live
        if live.ended is not None:  # ended while this one was in preprocess
            step._released = True
            raise self._gone(live)
        batcher = self.batchers[live.pin] if live.pin is not None else self.batchers[0]
        try:
            item = batcher.enqueue(step, deadline, priority, cost, key, length)
        except Exception as exc:
            self.release(step, exc)
            raise
        step._queued = True
        return item

    def release(self, step: SequenceStep[Any, Any], error: BaseException) -> None:
        """``step``'s caller got ``error`` instead of its answer (or was cancelled).

        A step that did not reach the batcher never ran: its sequence goes on
        without it, but a first step's ends it (``failed``), a last step's
        (``ended``), and one the caller gave up on or whose deadline passed
        (``cancelled``, ``expired``): later steps would miss it. A step that
        reached the batcher ends its sequence only when its caller left or
        its deadline passed, as the client cannot tell whether it counted.
        """
        live = step._live
        if step._released or live.ended is not None:
            return
        step._released = True
        cancelled = isinstance(error, anyio.get_cancelled_exc_class())
        expired = isinstance(error, DeadlineExceeded)
        reason = SequenceEnd.CANCELLED if cancelled else SequenceEnd.EXPIRED if expired else None
        if step._queued:
            if reason is not None:
                live.closed = True
                live.closing = live.closing or reason
                if step._finished and not live.busy:  # its batch is done: nothing ahead
                    self._end(live, live.closing)
            return
        if reason is None:
            reason = SequenceEnd.FAILED if step.start else SequenceEnd.ENDED if step.end else None
        if reason is not None:
            live.closed = True
            live.closing = live.closing or reason
        turn = step._turn
        if turn is not None and turn in live.pending:
            live.pending.remove(turn)  # the step ahead ends the sequence, if it must
        else:  # it holds the turn: hand it on, or end
            self._pass_turn(live)

    @staticmethod
    def _gone(live: _Live) -> MdsError:
        """The error of a step whose sequence ended before it was computed."""
        reason = live.ended.value if live.ended is not None else "ended"
        message = f"sequence {live.id!r} ended ({reason}) before this step was computed"
        if live.ended in (SequenceEnd.STOPPED, SequenceEnd.SWAPPED):
            return NotReady(f"not ready: {message}")
        return InvalidInput(message)

    def _open(self, sequence_id: SequenceId) -> _Live:
        if self.closing is not None:
            raise NotReady(
                f"not ready: it is stopping ({self.closing.value}) and starts no new "
                f"sequences; sequence {sequence_id!r} was not started"
            )
        if len(self._live) >= self.config.max_sequences:
            raise Overloaded(
                f"{len(self._live)} sequences are live, the most this model takes "
                f"(max_sequences); sequence {sequence_id!r} was not started: end a "
                "sequence, or try again later"
            )
        pin = None
        if self.config.pinned and len(self.batchers) > 1:
            pin = min(range(len(self._pins)), key=self._pins.__getitem__)
            self._pins[pin] += 1
        live = self._live[sequence_id] = _Live(sequence_id, self._clock(), pin)
        self._counts.sequences_started += 1
        if self._ended.get(sequence_id, (None, None))[1] == self._version:
            del self._ended[sequence_id]  # another version's end stays, for its late steps
        waiting = self._ending.get(sequence_id)
        if waiting is not None:  # its last namesake's end hook still runs: after it
            live.busy = True
            waiting.append(live)
        return live

    def abandon(self, item: Item) -> None:
        """A step's caller went away: its sequence ends once the step leaves the batcher.

        (Its caller then releases it, which ends the sequence at once if the
        step has left already.)
        """
        step: SequenceStep[Any, Any] = item.value
        live = step._live
        live.closed = True
        live.closing = live.closing or SequenceEnd.CANCELLED
        batcher = self.batchers[live.pin] if live.pin is not None else self.batchers[0]
        batcher.abandon(item)

    # -- a step's way out -----------------------------------------------------

    def finished(self, item: Item) -> None:
        """The batcher is done with ``item``: computed, expired or given up."""
        self._done(item.value)

    def _done(self, step: SequenceStep[Any, Any]) -> None:
        """``step`` left the batcher: the sequence's next step goes, or it ends."""
        live = step._live
        step._finished = True
        if live.ended is not None:
            return
        live.last = self._clock()
        if self._live.get(live.id) is live:
            self._live.move_to_end(live.id)
        if live.closing is not None:
            self._end(live, live.closing)
        elif not step._ran:  # it left uncomputed (expired; the model stops): later steps lack it
            self._end(live, self._stopping() or _uncomputed(step))
        elif step.start and not step._ok:
            self._end(live, SequenceEnd.FAILED)
        elif step.end:
            self._end(live, SequenceEnd.ENDED)
        else:
            self._pass_turn(live)

    def _stopping(self) -> SequenceEnd | None:
        """Why the model stops, if it does (its batchers are closed)."""
        if not self.batchers[0].closed:
            return None
        return SequenceEnd.SWAPPED if self.swapped else SequenceEnd.STOPPED

    def _pass_turn(self, live: _Live) -> None:
        if live.closing is not None:  # a step gave up, or the model stops: no more turns
            self._end(live, live.closing)
            return
        pending = live.pending
        while pending:
            waiter = pending.popleft()
            if not waiter.done():
                waiter.set_result(None)  # busy stays: the turn is that step's
                return
        live.busy = False
        if self._until == math.inf:  # the idle watch sleeps until woken: it has one to watch
            self._wake.set()

    def _end(self, live: _Live, reason: SequenceEnd) -> None:
        if live.ended is not None:
            return
        live.ended = reason
        live.closed = True
        if self._live.get(live.id) is live:
            del self._live[live.id]
        if live.pin is not None:
            self._pins[live.pin] -= 1
        self._counts.sequence_ends[reason.value] += 1
        self._ended[live.id] = (reason, self._version)
        self._ended.move_to_end(live.id)  # an id ended again is the newest
        if len(self._ended) > _REMEMBERED:
            self._ended.popitem(last=False)
        for waiter in live.pending:
            if not waiter.done():
                waiter.set_result(self._gone(live))
        live.pending.clear()
        if live.opened:
            index = live.instance if live.instance is not None else 0
            if not self._instances[index].ends_sequences:
                live.state = None  # no sequence_end to run: nothing to wait for
            else:
                self._ending.setdefault(live.id, [])
                self._due[live] = reason
                if self._tasks is not None:
                    self._tasks.start_soon(self._end_hook, live, reason)
        if not self._live and self._empty is not None:
            self._empty.set()

    async def _end_hook(self, live: _Live, reason: SequenceEnd) -> None:
        """Run ``sequence_end`` where the sequence ran; then a namesake may start."""
        if self._due.pop(live, None) is None:
            return  # run already
        with anyio.CancelScope(shield=True):
            index = live.instance if live.instance is not None else 0
            try:
                await self._instances[index].end_sequence(live.id, live.state, reason)
            except Exception as exc:
                logger.error(
                    "%s: sequence_end for sequence %r (%s) failed: %s",
                    self._where,
                    live.id,
                    reason.value,
                    describe(exc),
                    exc_info=exc,
                )
            finally:
                live.state = None
                for successor in self._ending.pop(live.id, ()):
                    if successor.ended is None:
                        self._pass_turn(successor)

    def _not_live(self, sequence_id: SequenceId) -> str:
        record = self._ended.get(sequence_id)
        if record is None:
            return f"sequence {sequence_id!r} is not live: its first step must have sequence_start"
        reason, version = record
        where = "" if version == self._version else f" on version {version}"
        return (
            f"sequence {sequence_id!r} is not live: it ended ({reason.value}){where}; start "
            "it again with sequence_start"
        )

    # -- idle sequences, and the model's stop ----------------------------------

    async def watch_idle(self) -> None:
        """End each sequence that has had no step for ``idle_timeout``; runs until cancelled."""
        timeout = self.config.idle_timeout
        while True:
            now = self._clock()
            wake = math.inf
            for live in list(self._live.values()):  # least recently active first
                if live.busy:
                    continue  # a step in flight: not idle, and moved back when done
                expires = live.last + timeout
                if expires > now:
                    wake = expires
                    break
                self._end(live, SequenceEnd.IDLE)
            self._until = wake
            self._wake = anyio.Event()
            with _loop.move_on_at(wake, self._clock()):
                await self._wake.wait()

    def draining(self) -> bool:
        """Whether the model stops, and drains the live sequence the request being served is of."""
        if self.config.on_stop != "drain" or self.closing is None:
            return False
        context = _current.get()
        return not context.sequence_start and self.holds(context.sequence_id)  # type: ignore[arg-type]

    async def drain(self, until: float) -> None:
        """Take no new sequences; wait (until ``until``) for the live ones to end."""
        self.closing = SequenceEnd.SWAPPED if self.swapped else SequenceEnd.STOPPED
        if self.config.on_stop != "drain" or not self._live:
            return
        self._empty = anyio.Event()
        with _loop.move_on_at(until, self._clock()):
            await self._empty.wait()

    async def close(self) -> None:
        """End every live sequence and run the end hooks: the model stops (or is swapped)."""
        self.closing = reason = SequenceEnd.SWAPPED if self.swapped else SequenceEnd.STOPPED
        self._tasks = None
        for live in list(self._live.values()):
            self._end(live, reason)
        with anyio.CancelScope(shield=True):
            # With those whose task was cancelled before it began (the model stopping).
            for live, ended in list(self._due.items()):
                await self._end_hook(live, ended)


def _uncomputed(step: SequenceStep[Any, Any]) -> SequenceEnd:
    """Why a sequence ends when ``step`` left the batcher without being computed."""
    if step.start:
        return SequenceEnd.FAILED
    return SequenceEnd.ENDED if step.end else SequenceEnd.EXPIRED
