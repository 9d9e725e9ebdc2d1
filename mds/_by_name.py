"""A runtime's request forms: each finds the servable a call names and hands over.

No serving of their own: the model or pipeline found serves (see
:class:`~mds._servable.Serving`), so a runtime and a servable answer alike.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any

from ._errors import MdsError
from ._servable import Servable

__all__ = ["ByName"]


class ByName:
    """Mixin: :meth:`serve`, :meth:`stream` and their forms, by the servable's name.

    Subclasses keep ``_servables`` (name to servable) and implement
    :meth:`servable` (the lookup, with its errors), ``running`` and
    ``_not_running``.
    """

    _servables: dict[str, Servable]

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def servable(self, name: str, version: str | None = None) -> Servable:
        raise NotImplementedError

    def _not_running(self) -> MdsError:
        raise NotImplementedError

    def serve(
        self,
        model: str,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> Coroutine[Any, Any, Any]:
        """Serve one request with the model or pipeline called ``model``. Await it.

        Callable from any thread or event loop (forwarded to the runtime's own
        loop when needed).

        Args:
            model: the model's (or pipeline's) name.
            request: the request, as the model's ``preprocess`` takes it.
            timeout: deadline in seconds from now; defaults to the model's.
            priority: priority level (0 is the highest); defaults to the model's.
            trace: return a :class:`Traced` with where the call's time went.
            sequence_id: for a stateful model, the sequence this request is
                a step of (see :doc:`/stateful`).
            sequence_start: it is the sequence's first step.
            sequence_end: it is the sequence's last step.

        Returns:
            The model's response (in a :class:`Traced` with ``trace=True``).

        Raises:
            ModelNotFound: no such model.
            MdsError: the errors :meth:`ModelRuntime.serve` raises (``NotReady``,
                ``Overloaded``, ``InvalidInput``, ``DeadlineExceeded``,
                ``InferenceError``).
        """
        # A plain def handing back the servable's coroutine: one coroutine
        # fewer per request on the path mds.serve takes.
        found = self._servables.get(model)
        if found is None:
            try:
                found = self.servable(model)
            except MdsError as exc:  # raised where the call is awaited, as by an async def
                return _raising(exc)
        return found.serve(
            request,
            timeout=timeout,
            priority=priority,
            trace=trace,
            sequence_id=sequence_id,
            sequence_start=sequence_start,
            sequence_end=sequence_end,
        )

    def serve_sync(
        self,
        model: str,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> Any:
        """Blocking form of :meth:`serve`, for threads with no event loop (Flask).

        Thread-safe; every call reuses the runtime's one loop.
        """
        target = self.servable(model)
        if not self.running:
            raise self._not_running()
        return target.serve_sync(
            request,
            timeout=timeout,
            priority=priority,
            trace=trace,
            sequence_id=sequence_id,
            sequence_start=sequence_start,
            sequence_end=sequence_end,
        )

    def serve_many(
        self,
        model: str,
        requests: Sequence[Any],
        *,
        timeout: float | None = None,
        priority: int | None = None,
    ) -> Coroutine[Any, Any, list[Any]]:
        """Serve several requests with one model or pipeline at once: they batch together.

        Each request is served as by :meth:`serve`, all concurrently. Await it.

        Returns:
            Per request, in order: its response, or the :class:`MdsError` it
            failed with (one failing request does not fail the others).

        Raises:
            ModelNotFound: no such model.

        Added in 0.3.
        """
        try:
            target = self.servable(model)
        except MdsError as exc:
            return _raising(exc)
        return target.serve_many(requests, timeout=timeout, priority=priority)

    def serve_many_sync(
        self,
        model: str,
        requests: Sequence[Any],
        *,
        timeout: float | None = None,
        priority: int | None = None,
    ) -> list[Any]:
        """Blocking form of :meth:`serve_many`, for threads with no event loop (Flask).

        Added in 0.3.
        """
        target = self.servable(model)
        if not self.running:
            raise self._not_running()
        return target.serve_many_sync(requests, timeout=timeout, priority=priority)

    def stream(
        self,
        model: str,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> AsyncIterator[Any]:
        """Serve one request and yield its response in chunks: see :meth:`ModelRuntime.stream`.

        A pipeline, like a model whose ``postprocess`` does not yield, gives
        its whole response as one chunk.

        Raises:
            ModelNotFound: no such model.
            MdsError: the errors :meth:`serve` raises.

        Added in 0.2.
        """
        return self.servable(model).stream(
            request,
            timeout=timeout,
            priority=priority,
            sequence_id=sequence_id,
            sequence_start=sequence_start,
            sequence_end=sequence_end,
        )

    def stream_sync(
        self,
        model: str,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> Iterator[Any]:
        """Blocking form of :meth:`stream`, for threads with no event loop (Flask).

        Added in 0.2.
        """
        target = self.servable(model)
        if not self.running:
            raise self._not_running()
        return target.stream_sync(
            request,
            timeout=timeout,
            priority=priority,
            sequence_id=sequence_id,
            sequence_start=sequence_start,
            sequence_end=sequence_end,
        )


async def _raising(error: BaseException) -> Any:
    """A coroutine that raises ``error`` when awaited."""
    raise error
