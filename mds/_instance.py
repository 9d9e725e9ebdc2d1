"""One instance of a model: a handler object bound to its device."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anyio

from ._calls import off_loop
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


class Instance:
    """A handler object, its context, and the limiter its blocking calls share.

    ``init``, ``infer`` and ``teardown`` share a limiter of one, so one
    instance never runs two of them at once; ``warmup`` and ``health`` use
    the model's shared limiter.
    """

    def __init__(
        self,
        handler: ModelHandler[Any, Any],
        context: ModelContext,
        shared: anyio.CapacityLimiter,
    ) -> None:
        self.handler = handler
        self.context = context
        own = anyio.CapacityLimiter(1)
        self._init = off_loop(handler.init, own)
        self._infer = off_loop(handler.infer, own)
        self._teardown = off_loop(handler.teardown, own)
        self._warmup = off_loop(handler.warmup, shared)
        self._health = off_loop(handler.health, shared)
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

    async def infer(self, batch: Sequence[Any]) -> list[Any]:
        """Run ``infer`` on ``batch``; per item, its output or its error.

        Never raises for the handler's faults: a raising ``infer`` or a wrong
        number of outputs becomes an error for every item of the batch.
        """
        size = len(batch)
        try:
            outputs = await self._infer(batch)
        except Exception as exc:
            logger.exception("%s: infer failed on a batch of %d", self.where, size)
            return [
                as_item_error(exc, f"{self.where}: infer failed on a batch of {size}")
                for _ in range(size)
            ]
        return self._per_item(outputs, size)

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
        return [
            as_item_error(out, f"{self.where}: infer failed for this item")
            if isinstance(out, BaseException)
            else out
            for out in items
        ]

    def _batch_error(self, problem: str, size: int) -> list[Any]:
        logger.error("%s: %s", self.where, problem)
        return [InferenceError(f"{self.where}: {problem}") for _ in range(size)]
