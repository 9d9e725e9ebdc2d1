"""One instance of a model: a handler object bound to its device."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any, cast

from ._batching import fast
from ._batching.fast import Threads
from ._calls import is_async, off_loop
from ._devices.kinds import DeviceKind
from ._devices.manager import DeviceManager
from ._errors import InferenceError, MdsError
from ._handler import ModelContext, ModelHandler

__all__ = ["Instance", "as_item_error"]

logger = logging.getLogger(__name__)


def as_item_error(exc: BaseException, where: str) -> BaseException:
    """The error one request gets when computing it failed.

    mds errors pass through (a handler may fail an item with
    :class:`mds.InvalidInput`); anything else becomes an
    :class:`InferenceError` that names where it happened, cause chained.
    """
    if isinstance(exc, MdsError):
        return exc
    error = InferenceError(f"{where}: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
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
        self.threads = own = fast.threads(1, f"mds-{context.name}-{context.instance}")
        self._init = off_loop(handler.init, own)
        self._teardown = off_loop(handler.teardown, own)
        self._warmup = off_loop(handler.warmup, shared)
        self._health = off_loop(handler.health, shared)
        # A plain infer runs on the one thread, batches in order of arrival:
        # the batcher may hand the next over while one computes.
        self.queues_batches = not is_async(handler.infer)
        self._collates = overrides(handler, "collate") or handler.collator is not None
        self._splits = overrides(handler, "split") or handler.collator is not None
        self._compute: Callable[[list[Any]], Any]
        if not (self._collates or self._splits):
            self._compute = off_loop(handler.infer, own)
        elif is_async(handler.infer):
            self._compute = self._collate_infer_split_async
        else:
            # collate, infer and split together in one thread hop
            self._compute = off_loop(self._collate_infer_split, own)
        self.where = (
            f"model {context.name!r} instance {context.instance} "
            f"({type(handler).__name__} on {context.device})"
        )

    async def init(self) -> None:
        await self._init(self.context)

    async def teardown(self) -> None:
        await self._teardown()

    async def warmup_examples(self) -> list[Any]:
        examples = await self._warmup()
        return [] if examples is None else list(examples)

    async def health(self) -> bool:
        return bool(await self._health())

    def _collate_infer_split(self, values: list[Any]) -> Sequence[Any]:
        handler = self.handler
        batch = handler.collate(values) if self._collates else values
        outputs = handler.infer(batch)
        return handler.split(outputs, batch) if self._splits else cast(Sequence[Any], outputs)

    async def _collate_infer_split_async(self, values: list[Any]) -> Sequence[Any]:
        handler = self.handler
        batch = handler.collate(values) if self._collates else values
        outputs = await handler.infer(batch)  # type: ignore[misc]
        return handler.split(outputs, batch) if self._splits else outputs

    async def compute(self, values: list[Any]) -> list[Any]:
        """Per item, its output or its error.

        Raises what ``collate``, ``infer`` or ``split`` raised: the batcher
        then looks for the items at fault. A wrong number of outputs is not
        raised but answered, for every item, with an error. An error that
        means the device failed marks the device failed.
        """
        try:
            outputs = await self._compute(values)
        except Exception as exc:
            if self._kind.is_device_failure(exc):
                self._devices._mark_failed(self.device, f"{type(exc).__name__}: {exc}")
            raise
        return self._per_item(outputs, len(values))

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
        """The errors for a batch of ``size`` items whose computation raised ``exc``."""
        logger.error("%s: infer failed on a batch of %d", self.where, size, exc_info=exc)
        where = f"{self.where}: infer failed on a batch of {size}"
        return [as_item_error(exc, where) for _ in range(size)]

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
            where = f"{self.where}: infer failed for this item"
            return [as_item_error(o, where) if isinstance(o, BaseException) else o for o in items]
        return items

    def _batch_error(self, problem: str, size: int) -> list[Any]:
        logger.error("%s: %s", self.where, problem)
        return [InferenceError(f"{self.where}: {problem}") for _ in range(size)]
