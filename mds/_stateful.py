"""What a stateful model's handler sees of its sequences: steps, their ends, their ids.

The sequencer that orders and batches the steps is :mod:`mds._sequences`.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any, Generic

import msgspec
from typing_extensions import TypeVar

from . import _loop
from ._errors import InvalidInput
from ._request import EMPTY_CONTEXT, RequestContext, _current

__all__ = ["SequenceEnd", "SequenceId", "SequenceStep", "check_id", "in_sequence", "new_sequence"]

SequenceId = int | str
InputT = TypeVar("InputT", default=Any)
StateT = TypeVar("StateT", default=Any)


class SequenceEnd(enum.Enum):
    """Why a sequence ended: what ``sequence_end`` is told.

    Added in 0.5.
    """

    #: Its client ended it: a step with ``sequence_end``.
    ENDED = "ended"
    #: No step came for ``SequenceConfig.idle_timeout`` seconds.
    IDLE = "idle"
    #: A step's caller went away (cancelled, disconnected) before it was answered:
    #: whether the state took that step is unknown to the client, so it ends.
    CANCELLED = "cancelled"
    #: A step's deadline passed before it was answered: it was not computed (and
    #: the steps after it would miss it), or the client cannot tell that it was.
    EXPIRED = "expired"
    #: Its first step failed (or ``sequence_start`` raised): the client may start it again.
    FAILED = "failed"
    #: The model stopped or was unloaded.
    STOPPED = "stopped"
    #: A reload replaced the model with another copy or version.
    SWAPPED = "swapped"


class SequenceStep(Generic[InputT, StateT]):
    """One step of a sequence, as a stateful model's ``infer`` gets it.

    Set :attr:`state` to the sequence's new state; the next step of the
    sequence gets it. A step whose output is an error leaves the state as
    it was before the step.

    Attributes:
        sequence_id: the sequence's id.
        input: the step's preprocessed request.
        state: the state the sequence's last step left; on its first step,
            what ``sequence_start`` returned (``None`` by default).
        start: whether this is the sequence's first step.
        end: whether this is its last step.

    Example:
        >>> def infer(self, steps):
        ...     for step in steps:
        ...         step.state = (step.state or 0.0) + step.input
        ...     return [step.state for step in steps]

    Added in 0.5.
    """

    __slots__ = (
        "_finished",
        "_live",
        "_ok",
        "_owner",
        "_queued",
        "_ran",
        "_released",
        "_turn",
        "end",
        "input",
        "sequence_id",
        "start",
        "state",
    )

    def __init__(
        self, sequence_id: SequenceId, input: InputT, *, start: bool, end: bool, live: _Live
    ) -> None:
        self.sequence_id = sequence_id
        self.input = input
        self.state: StateT = None  # type: ignore[assignment]  # set before infer sees it
        self.start = start
        self.end = end
        self._live = live
        self._ok = False  # its output (and state) were kept
        self._turn: _loop.Waiter | None = None  # set while steps of its sequence are ahead
        self._queued = False  # reached the batcher
        self._ran = False  # given to infer
        self._finished = False  # left the batcher
        self._released = False  # its caller got an error instead of its answer
        self._owner: Any = None  # the Sequences that admitted it

    def _release(self, error: BaseException) -> None:
        """See ``Sequences.release`` (mds._sequences)."""
        if self._owner is not None:
            self._owner.release(self, error)

    def __repr__(self) -> str:
        flags = "".join((" start" if self.start else "", " end" if self.end else ""))
        return f"<SequenceStep {self.sequence_id!r}{flags} input={self.input!r:.60}>"


def check_id(value: Any, where: str = "sequence_id") -> SequenceId:
    """``value`` if it may name a sequence: a non-zero integer or a non-empty string."""
    if isinstance(value, bool) or not isinstance(value, int | str) or value in (0, ""):
        raise InvalidInput(
            f"{where}: {value!r:.60} is not a sequence id; give a non-zero integer or a "
            'non-empty string (0 and "" mean no sequence, as in Triton)'
        )
    return value


def in_sequence(
    target: Any, sequence_id: Any, start: bool, end: bool, where: str = "sequence_id"
) -> RequestContext:
    """The request context of a step of ``sequence_id`` sent to ``target`` (checked).

    Raises:
        InvalidInput: ``target`` is not stateful, or the id or flags do not name a step.
    """
    if sequence_id is None:
        raise target.add_context(
            InvalidInput(f"sequence_start and sequence_end need a sequence id ({where})")
        )
    try:
        check_id(sequence_id, where)
    except InvalidInput as exc:
        raise target.add_context(exc) from None
    if not target.stateful:
        raise target.add_context(
            InvalidInput(
                f"it is not stateful: it takes no sequence id ({where} {sequence_id!r}); "
                "set ModelConfig.sequences to serve sequences"
            )
        )
    context = _current.get()
    if context is EMPTY_CONTEXT:  # the common case, made directly (per request)
        return RequestContext(sequence_id=sequence_id, sequence_start=start, sequence_end=end)
    return msgspec.structs.replace(
        context, sequence_id=sequence_id, sequence_start=start, sequence_end=end
    )


def new_sequence(sequence_id: SequenceId, value: Any) -> SequenceStep[Any, Any]:
    """The one step of a sequence of its own (warm-up, batches made by hand)."""
    return SequenceStep(
        sequence_id, value, start=True, end=True, live=_Live(sequence_id, 0.0, None)
    )


class _Live:
    """One sequence, from its start until its end hook has run."""

    __slots__ = (
        "busy",
        "closed",
        "closing",
        "ended",
        "id",
        "instance",
        "last",
        "opened",
        "pending",
        "pin",
        "state",
    )

    def __init__(self, sequence_id: SequenceId, now: float, pin: int | None) -> None:
        self.id = sequence_id
        self.state: Any = None
        self.opened = False  # sequence_start has run
        self.instance: int | None = pin  # where sequence_start ran (and sequence_end will)
        self.pin = pin
        self.busy = False  # a step of it is in the batcher, or has the turn
        self.pending: deque[_loop.Waiter] = deque()  # steps waiting for their turn
        self.closed = False  # its last step came: no more steps
        self.closing: SequenceEnd | None = None  # to end once its step in flight is done
        self.ended: SequenceEnd | None = None
        self.last = now
