"""One instance of a model: a handler object bound to its device."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from itertools import repeat
from typing import Any, cast

from ._batching.queue import DONE, Item
from ._devices.kinds import DeviceKind
from ._devices.manager import DeviceManager
from ._errors import ConfigError, InferenceError, MdsError, describe
from ._handler import ModelContext, ModelHandler
from ._stateful import SequenceEnd, SequenceId, SequenceStep, new_sequence
from ._threads import Threads, is_async, off_loop, threads

__all__ = ["Instance", "as_item_error", "overrides"]

logger = logging.getLogger("mds.model")


def as_item_error(exc: BaseException, problem: str, instance: int | None = None) -> MdsError:
    """The error one request gets when computing it failed.

    mds errors keep their class (a handler may fail an item with
    :class:`mds.InvalidInput`), copied: each caller gets an error of its
    own, whose context its own path fills in. Anything else becomes an
    :class:`InferenceError` that says what failed. The cause is chained.
    """
    if isinstance(exc, MdsError):
        error = _copy(exc)
        error.__cause__ = exc.__cause__ if exc.__cause__ is not None else exc
        return error.add_context(instance=instance)
    error = InferenceError(f"{problem}: {describe(exc)}", instance=instance)
    error.__cause__ = exc
    return error


def _copy(exc: MdsError) -> MdsError:
    """A copy of ``exc`` made without calling its ``__init__`` (which may be the user's own)."""
    try:
        error: MdsError = type(exc).__new__(type(exc), *exc.args)
        error.args = exc.args
        error.__dict__.update(exc.__dict__)
    except Exception:  # pragma: no cover - a class that cannot be made this way: share it
        return exc
    return error


def overrides(handler: ModelHandler[Any, Any], method: str) -> bool:
    """Whether the handler's class overrides ``ModelHandler.<method>``."""
    return getattr(type(handler), method) is not getattr(ModelHandler, method)


class Instance:
    """A handler object, its context, and the threads its blocking calls use.

    ``init``, ``infer`` (with collate and split) and ``teardown`` run on the
    instance's own thread; ``warmup`` and ``health`` on the model's shared
    threads.
    """

    def __init__(
        self,
        handler: ModelHandler[Any, Any],
        context: ModelContext,
        shared: Threads,
        devices: DeviceManager,
    ) -> None:
        self.handler = handler
        self.context = context
        self.index = context.instance
        self.device = context.device
        self._devices = devices
        self._kind: DeviceKind = devices.kind(context.device.kind)
        # One thread of its own: init, infer and teardown never overlap, and
        # always run on the same thread (some libraries care).
        self.threads = own = threads(1, f"mds-{context.name}-{context.instance}")
        self._init = off_loop(handler.init, own)
        self._teardown = off_loop(handler.teardown, own)
        # The defaults answer at once: no thread hop for them.
        self._warmup = off_loop(handler.warmup, shared) if overrides(handler, "warmup") else None
        self._health = off_loop(handler.health, shared) if overrides(handler, "health") else None
        # A plain infer runs on the one thread, batches in order of arrival:
        # the batcher may hand the next over while one computes.
        self.queues_batches = not is_async(handler.infer)
        self._collates = overrides(handler, "collate") or handler.collator is not None
        self._splits = overrides(handler, "split") or handler.collator is not None
        #: A stateful model's: its batches are SequenceSteps (see mds._sequences).
        self.stateful = context.config.sequences is not None
        self._run: Callable[[list[Any]], Sequence[Any]] = self._batch
        self._run_async: Callable[[list[Any]], Awaitable[Sequence[Any]]] = self._batch_async
        self._ends: Callable[..., Awaitable[Any]] | None = None
        if self.stateful:
            self._check_stateful(handler)
            self._starts = overrides(handler, "sequence_start")
            if overrides(handler, "sequence_end"):
                self._ends = off_loop(handler.sequence_end, own)
            self._run, self._run_async = self._steps_batch, self._steps_batch_async
        self._compute: Callable[[list[Any]], Any]
        self._compute_items: Callable[[list[Item]], Any]
        if self.queues_batches:
            # collate, infer and split together in one thread hop
            self._compute = off_loop(self._run, own)
            self._compute_items = off_loop(self._live_batch, own)
        else:
            self._compute = self._run_async
            self._compute_items = self._live_batch_async
        #: For logs: which model, instance, handler and device.
        self.where = (
            f"model {context.name!r} instance {context.instance} "
            f"({type(handler).__name__} on {context.device})"
        )

    async def init(self) -> None:
        await self._init(self.context)

    async def teardown(self) -> None:
        await self._teardown()

    async def warmup_examples(self) -> list[Any]:
        examples = await self._warmup() if self._warmup is not None else None
        return [] if examples is None else list(examples)

    async def health(self) -> bool:
        return bool(await self._health()) if self._health is not None else True

    # -- a batch ----------------------------------------------------------------

    def _batch(self, values: list[Any]) -> Sequence[Any]:
        handler = self.handler
        batch = handler.collate(values) if self._collates else values
        outputs = handler.infer(batch)
        return handler.split(outputs, batch) if self._splits else cast(Sequence[Any], outputs)

    async def _batch_async(self, values: list[Any]) -> Sequence[Any]:
        handler = self.handler
        batch = handler.collate(values) if self._collates else values
        outputs = await handler.infer(batch)  # type: ignore[misc]
        return handler.split(outputs, batch) if self._splits else outputs

    def _live_batch(self, items: list[Item]) -> tuple[list[int], Sequence[Any]]:
        """The batch as it starts, without the items answered meanwhile.

        Their deadline passed while the batch waited for this thread: they
        are never computed.
        """
        live = [i for i, item in enumerate(items) if item.state != DONE]
        if not live:
            return live, []
        if len(live) == len(items):
            return live, self._run([item.value for item in items])
        return live, self._run([items[i].value for i in live])

    async def _live_batch_async(self, items: list[Item]) -> tuple[list[int], Sequence[Any]]:
        live = [i for i, item in enumerate(items) if item.state != DONE]
        if not live:
            return live, []
        return live, await self._run_async([items[i].value for i in live])

    # -- a stateful model's batch ---------------------------------------------------

    def _check_stateful(self, handler: ModelHandler[Any, Any]) -> None:
        if handler.collator is not None:
            raise ConfigError(
                f"{type(handler).__name__} is stateful (ModelConfig.sequences) and has a "
                "collator: its infer gets SequenceStep objects, which a collator cannot "
                "stack; collate the steps' inputs in infer (or collate) instead"
            )
        if self.queues_batches and is_async(handler.sequence_start):
            raise ConfigError(
                f"{type(handler).__name__}.sequence_start is async but infer is not: "
                "make both plain or both async (sequence_start runs with infer)"
            )

    def _steps_batch(self, steps: list[SequenceStep[Any, Any]]) -> Sequence[Any]:
        """Open the sequences that start here, give each step its state, keep the new states."""
        run, failed = self._give_states(steps, self._first_states(steps))
        return self._keep(steps, run, self._batch(run) if run else [], failed)

    async def _steps_batch_async(self, steps: list[SequenceStep[Any, Any]]) -> Sequence[Any]:
        firsts = self._first_states(steps)
        for index, state in firsts.items():  # an async sequence_start: awaited here
            if inspect.isawaitable(state):
                try:
                    firsts[index] = await state
                except Exception as exc:
                    firsts[index] = _StartFailed(exc)
        run, failed = self._give_states(steps, firsts)
        return self._keep(steps, run, await self._batch_async(run) if run else [], failed)

    def _first_states(self, steps: list[SequenceStep[Any, Any]]) -> dict[int, Any]:
        """What ``sequence_start`` gives each step whose sequence starts here (or raises)."""
        firsts: dict[int, Any] = {}
        for index, step in enumerate(steps):
            if not step._live.opened:
                try:
                    firsts[index] = (
                        self.handler.sequence_start(step.sequence_id) if self._starts else None
                    )
                except Exception as exc:
                    firsts[index] = _StartFailed(exc)
        return firsts

    def _give_states(
        self, steps: list[SequenceStep[Any, Any]], firsts: dict[int, Any]
    ) -> tuple[list[SequenceStep[Any, Any]], dict[int, MdsError]]:
        """Open the sequences that start (``firsts``), give each step its state: those to run."""
        failed: dict[int, MdsError] = {}
        for index, step in enumerate(steps):
            live = step._live
            if index in firsts:
                first = firsts[index]
                if isinstance(first, _StartFailed):
                    failed[index] = as_item_error(first.exc, "sequence_start failed", self.index)
                    continue
                live.state, live.opened, live.instance = first, True, self.index
            step.state = live.state
            step._ran = True
        run = [step for index, step in enumerate(steps) if index not in failed] if failed else steps
        return run, failed

    def _keep(
        self,
        steps: list[SequenceStep[Any, Any]],
        run: list[SequenceStep[Any, Any]],
        outputs: Any,
        failed: dict[int, MdsError],
    ) -> Sequence[Any]:
        """Keep the state of each step whose output is not an error; outputs for every step."""
        if isinstance(outputs, str | bytes) or not hasattr(outputs, "__len__"):
            return outputs if not failed else self._per_item(outputs, len(run))
        if len(outputs) != len(run):
            return outputs if not failed else self._per_item(outputs, len(run))
        items = outputs if isinstance(outputs, list) else [outputs[i] for i in range(len(run))]
        for step, output in zip(run, items, strict=True):
            if not isinstance(output, BaseException):
                step._live.state = step.state
                step._ok = True
        if not failed:
            return items
        given = iter(items)
        return [failed[i] if i in failed else next(given) for i in range(len(steps))]

    @property
    def ends_sequences(self) -> bool:
        """Whether the handler has a ``sequence_end`` of its own to run."""
        return self._ends is not None

    async def end_sequence(self, sequence_id: SequenceId, state: Any, reason: SequenceEnd) -> None:
        """Run the handler's ``sequence_end`` (on this instance's thread, for a plain one)."""
        if self._ends is not None:
            await self._ends(sequence_id, state, reason)

    async def _compute_alone(self, values: list[Any]) -> Sequence[Any]:
        """A stateful model's batch made by hand: each value a sequence of one step."""
        steps = [new_sequence(f"mds-by-hand-{i}", value) for i, value in enumerate(values)]
        try:
            return await self._compute(steps)  # type: ignore[no-any-return]
        finally:
            for step in steps:
                if step._live.opened:
                    await self.end_sequence(step.sequence_id, step._live.state, SequenceEnd.ENDED)

    async def compute(self, values: list[Any]) -> list[Any]:
        """Per value, its output or its error: a batch made by hand (warm-up, testing).

        Raises what ``collate``, ``infer`` or ``split`` raised. A wrong
        number of outputs is not raised but answered, for every item, with
        an error. An error that means the device failed marks the device failed.
        """
        try:
            outputs = await (self._compute_alone if self.stateful else self._compute)(values)
        except Exception as exc:
            self._check_device(exc)
            raise
        return self._per_item(outputs, len(values))

    async def compute_items(self, items: list[Item]) -> list[Any]:
        """Per queued item, its output or its error, as :meth:`compute`.

        Items already answered when the batch starts are not computed (their
        place holds ``None``).
        """
        try:
            live, outputs = await self._compute_items(items)
        except Exception as exc:
            self._check_device(exc)
            raise
        if len(live) == len(items):
            return self._per_item(outputs, len(items))
        outcomes: list[Any] = [None] * len(items)
        if live:
            for index, outcome in zip(live, self._per_item(outputs, len(live)), strict=True):
                outcomes[index] = outcome
        return outcomes

    def _check_device(self, exc: Exception) -> None:
        if self._kind.is_device_failure(exc):
            self._devices.mark_failed(self.device, describe(exc))

    def is_out_of_memory(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the batch did not fit in the device's memory."""
        return self._kind.is_out_of_memory(exc)

    def release_memory(self) -> None:
        """Let the device's caches go after running out of memory."""
        try:
            self._kind.release_memory(self.device)
        except Exception:
            logger.exception("%s: releasing memory after running out failed", self.where)

    def failure(self, exc: Exception, size: int) -> list[Any]:
        """The errors for a batch of ``size`` items whose computation raised ``exc``.

        Not logged here: each request logs its own failure (with its cause).
        """
        problem = f"infer failed on a batch of {size}"
        return [as_item_error(exc, problem, self.index) for _ in range(size)]

    def _per_item(self, outputs: Any, size: int) -> list[Any]:
        if isinstance(outputs, list):
            items = outputs
        elif isinstance(outputs, (str, bytes)) or not hasattr(outputs, "__len__"):
            return self._batch_error(
                f"infer returned {type(outputs).__name__}; it must return a "
                f"sequence with one output per item ({size} items)",
                size,
            )
        else:
            items = [outputs[i] for i in range(len(outputs))]
        if len(items) != size:
            return self._batch_error(
                f"infer returned {len(items)} outputs for {size} items; "
                "it must return exactly one output per item",
                size,
            )
        if any(map(isinstance, items, repeat(BaseException))):
            problem = "infer failed for this item"
            return [
                as_item_error(o, problem, self.index) if isinstance(o, BaseException) else o
                for o in items
            ]
        return items

    def _batch_error(self, problem: str, size: int) -> list[Any]:
        return [InferenceError(problem, instance=self.index) for _ in range(size)]


class _StartFailed:
    """What ``sequence_start`` raised for a step (its state would be any object)."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc
