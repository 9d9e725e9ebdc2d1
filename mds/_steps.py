"""The per-request steps around the batcher: preprocess, item hooks, postprocess.

They come from the first instance's handler and run in the caller's task.
Steps the handler does not override are skipped outright (no call, no thread
hop), which keeps a handler that only implements ``infer`` at the cost of
the batcher alone.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable, Iterator
from typing import Any, cast

from . import _loop
from ._errors import DeadlineExceeded, InferenceError, InvalidInput, MdsError, describe
from ._handler import ModelHandler
from ._instance import overrides
from ._threads import Threads, off_loop, plain_form

__all__ = ["Steps"]

logger = logging.getLogger("mds.model")


class Steps:
    """One model's per-request steps, with the errors they turn into."""

    def __init__(self, handler: ModelHandler[Any, Any], name: str, threads: Threads) -> None:
        self._name = name  # for logs
        # The handler's own steps are ``None`` where it keeps the default
        # (identity): the caller skips those without a call.
        pre = handler.preprocess if overrides(handler, "preprocess") else None
        #: ``preprocess`` as a plain call on the loop, where mds's own handler
        #: marks it as one (a check of the request): no coroutine per request.
        self.pre_plain = plain_form(pre) if pre is not None else None
        #: Otherwise the handler's own ``preprocess``, awaited or run in a thread.
        self.pre: Callable[[Any], Awaitable[Any]] | None = (
            off_loop(pre, threads) if pre is not None and self.pre_plain is None else None
        )
        post = handler.postprocess
        #: Whether ``postprocess`` yields: the model streams its responses.
        self.streams = inspect.isgeneratorfunction(post) or inspect.isasyncgenfunction(post)
        self._open = post
        self._threads = threads
        self.post: Callable[[Any], Awaitable[Any]] | None = (
            (self._collect if self.streams else off_loop(post, threads))
            if overrides(handler, "postprocess")
            else None
        )
        #: Whether ``postprocess`` runs in a worker thread (a plain ``def``).
        self.post_in_thread = self.post is not None and not (
            self.streams or inspect.iscoroutinefunction(post)
        )
        collator = handler.collator
        self._cost = handler.cost if overrides(handler, "cost") else None
        self._bucket = (
            handler.bucket if overrides(handler, "bucket") or hasattr(collator, "bucket") else None
        )
        self._length: Callable[[Any], int] | None = getattr(collator, "length", None)
        #: Whether ``describe`` has anything to compute.
        self.describes = any(f is not None for f in (self._cost, self._bucket, self._length))

    async def preprocess(self, request: Any, deadline: float | None) -> Any:
        """The model input for ``request``; :class:`InvalidInput` if it is rejected."""
        if self.pre is None:
            return request if self.pre_plain is None else self.preprocess_plain(request)
        try:
            if deadline is None:  # the common case, with no coroutine of _within's
                return await self.pre(request)
            return await _within(self.pre, request, deadline, "preprocess")
        except MdsError:
            raise
        except Exception as exc:
            logger.debug("%s: preprocess rejected a request", self._name, exc_info=True)
            raise InvalidInput(f"preprocess rejected the request: {describe(exc)}") from exc

    def preprocess_plain(self, request: Any) -> Any:
        """:meth:`preprocess` for a handler whose step is plain (``pre_plain``)."""
        assert self.pre_plain is not None
        try:
            return self.pre_plain(request)
        except MdsError:
            raise
        except Exception as exc:
            logger.debug("%s: preprocess rejected a request", self._name, exc_info=True)
            raise InvalidInput(f"preprocess rejected the request: {describe(exc)}") from exc

    def describe(self, item: Any) -> tuple[int, Hashable, int | None]:
        """The item's cost, bucket and length, for the batcher (which checks the cost)."""
        try:
            return (
                self._cost(item) if self._cost is not None else 1,
                self._bucket(item) if self._bucket is not None else None,
                self._length(item) if self._length is not None else None,
            )
        except Exception as exc:
            raise InvalidInput(f"could not size the request for batching: {describe(exc)}") from exc

    async def postprocess(self, output: Any, deadline: float | None) -> Any:
        """The response for ``output``; :class:`InferenceError` if postprocess fails."""
        if self.post is None:
            return output
        try:
            if deadline is None:
                return await self.post(output)
            return await _within(self.post, output, deadline, "postprocess")
        except MdsError:
            raise
        except Exception as exc:
            # Logged by the request it fails (once, with the cause).
            raise InferenceError(f"postprocess failed: {describe(exc)}") from exc

    async def _collect(self, output: Any) -> list[Any]:
        """A streaming postprocess's chunks, all of them (for a plain ``infer``)."""
        return [chunk async for chunk in self.chunks(output, None)]

    async def chunks(self, output: Any, deadline: float | None) -> AsyncGenerator[Any, None]:
        """The chunks a streaming ``postprocess`` yields for ``output``, as it makes them.

        A plain generator runs in the model's threads, one hop per chunk; an
        async one on the loop. Leaving early closes the generator. A
        postprocess that does not yield gives its response as one chunk.
        """
        if not self.streams:
            yield await self.postprocess(output, deadline)
            return
        if inspect.isasyncgenfunction(self._open):
            agen = self._open(output)
            try:
                while True:
                    try:
                        chunk = await _within(anext, agen, deadline, "postprocess")
                    except StopAsyncIteration:
                        return
                    except MdsError:
                        raise
                    except Exception as exc:
                        raise self._stream_failed(exc) from exc
                    yield chunk
            finally:
                await agen.aclose()
        else:
            gen = cast(Iterator[Any], self._open(output))
            try:
                while True:
                    try:
                        chunk = await _within(self._next, gen, deadline, "postprocess")
                    except MdsError:
                        raise
                    except Exception as exc:
                        raise self._stream_failed(exc) from exc
                    if chunk is _END:
                        return
                    yield chunk
            finally:
                await self._threads.run(_close, gen)

    async def _next(self, gen: Iterator[Any]) -> Any:
        return await self._threads.run(next, gen, _END)

    def _stream_failed(self, exc: Exception) -> InferenceError:
        return InferenceError(f"postprocess failed while streaming: {describe(exc)}")


_END = object()


def _close(gen: Any) -> None:
    gen.close()


async def _within(
    step: Callable[[Any], Awaitable[Any]], arg: Any, deadline: float | None, name: str
) -> Any:
    """``await step(arg)``, bounded by ``deadline`` when there is one."""
    if deadline is None:
        return await step(arg)
    with _loop.move_on_at(deadline, _loop.clock()()):
        return await step(arg)
    raise DeadlineExceeded(f"the request's deadline passed in {name}")
