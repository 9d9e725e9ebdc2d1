"""The one contract that the runtime and every transport serve through.

Models and pipelines (and, next, a model's versions) implement it; a
transport never asks which kind it holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator, Sequence
from threading import get_ident as _get_ident
from typing import Any, Generic, Literal, Protocol, overload

import anyio
from typing_extensions import TypeVar

from ._bridge import Home, process_portal
from ._errors import MdsError
from ._handler import ModelState, RequestT, ResponseT
from ._request import _current
from ._stateful import in_sequence
from ._status import CallTrace, ModelHealth, PipelineHealth, Traced
from ._tensors import Signature

__all__ = ["Servable", "Serving", "Signature"]

_NO_SEQUENCE = (None, False, False)
TraceT = TypeVar("TraceT", default=CallTrace)
HealthT = TypeVar("HealthT", bound=ModelHealth | PipelineHealth, default=ModelHealth)


class Servable(Protocol):
    """What a runtime serves by name: a :class:`ModelRuntime` or a :class:`PipelineRuntime`.

    Every call is callable from any thread or event loop: it is forwarded
    to the loop the servable lives in when need be. A transport (yours, or
    one of mds's) serves through this alone, whatever it holds.

    Example:
        >>> target = runtime.servable("classifier")
        >>> target.platform, target.signature()
        >>> response = await target.serve(request, timeout=1.0)

    Added in 0.3.
    """

    @property
    def name(self) -> str:
        """The name requests use."""
        ...

    @property
    def version(self) -> str:
        """The version that answers requests that name none."""
        ...

    @property
    def versions(self) -> tuple[str, ...]:
        """Every version a request may name."""
        ...

    @property
    def platform(self) -> str:
        """What it runs on, as the Open Inference Protocol's metadata says it."""
        ...

    @property
    def state(self) -> ModelState:
        """Its lifecycle state (a pipeline's: that of its least ready model)."""
        ...

    @property
    def ready(self) -> bool:
        """Whether it takes requests now."""
        ...

    @property
    def streams(self) -> bool:
        """Whether its responses come in chunks (see :meth:`stream`)."""
        ...

    @property
    def queue_capacity(self) -> int | None:
        """The most requests it holds queued at once; ``None`` where no one queue bounds it."""
        ...

    @property
    def stateful(self) -> bool:
        """Whether its requests are steps of sequences (a stateful model, or a pipeline with one).

        Added in 0.5.
        """
        ...

    def signature(self) -> Signature | None:
        """The named tensors one request carries and one response gives, if known."""
        ...

    def from_tensors(self, tensors: dict[str, Any]) -> Any:
        """The request one protocol request's tensors make (:meth:`ModelHandler.from_tensors`)."""
        ...

    def to_tensors(self, response: Any) -> Any:
        """The output tensors for one response (see :meth:`ModelHandler.to_tensors`)."""
        ...

    def add_context(self, error: MdsError) -> MdsError:
        """``error``, with where it happened filled in: this model (and version) or pipeline."""
        ...

    def choose(self) -> Servable:
        """What serves one request: for a model, one version picked by its traffic split.

        A transport decodes, serves and encodes one request through what
        this returns, so that all of it sees one version and the reply can
        say which (its ``version``). Anything but a model returns itself.

        Added in 0.4.
        """
        ...

    def serve(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> Coroutine[Any, Any, Any]:
        """Serve one request; await the response."""
        ...

    def serve_sync(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> Any:
        """Blocking form of :meth:`serve`, for threads with no event loop."""
        ...

    def stream(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> AsyncIterator[Any]:
        """Serve one request and yield its response in chunks."""
        ...

    def stream_sync(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> Iterator[Any]:
        """Blocking form of :meth:`stream`."""
        ...

    def serve_many(
        self, requests: Sequence[Any], *, timeout: float | None = None, priority: int | None = None
    ) -> Coroutine[Any, Any, list[Any]]:
        """Serve requests at once (they batch together); each's response or error in its place."""
        ...

    def serve_many_sync(
        self, requests: Sequence[Any], *, timeout: float | None = None, priority: int | None = None
    ) -> list[Any]:
        """Blocking form of :meth:`serve_many`."""
        ...

    def health(self) -> Awaitable[ModelHealth | PipelineHealth]:
        """Readiness now, with the reason when not ready. Await it."""
        ...

    def health_sync(self) -> ModelHealth | PipelineHealth:
        """Blocking form of :meth:`health`."""
        ...


class Serving(Generic[RequestT, ResponseT, TraceT, HealthT]):
    """The request forms every servable offers, written once over its request path.

    A servable implements ``_serve(request, timeout, priority, trace, stream)``
    (awaited in its own loop; with ``stream``, it returns the async iterator
    of chunks) and ``_health()``, and keeps its :class:`~mds._bridge.Home`
    in ``_home``; this gives it :meth:`serve`, :meth:`stream`,
    :meth:`serve_many` and :meth:`health` and their blocking forms, callable
    from any thread or event loop.
    """

    _home: Home

    async def _serve(
        self, request: Any, timeout: float | None, priority: int | None, trace: bool, stream: bool
    ) -> Any:
        raise NotImplementedError

    async def _health(self) -> HealthT:
        raise NotImplementedError

    @property
    def stateful(self) -> bool:
        """Whether its requests are steps of sequences (see :class:`SequenceConfig`)."""
        return False

    async def _serve_step(
        self,
        flags: tuple[Any, bool, bool],
        request: Any,
        timeout: float | None,
        priority: int | None,
        trace: bool,
        stream: bool,
    ) -> Any:
        """:meth:`_serve`, for a request that names a sequence (``flags``: id, start, end)."""
        if flags == _NO_SEQUENCE:
            return await self._serve(request, timeout, priority, trace, stream)
        token = _current.set(in_sequence(self, *flags))  # (set directly: per request)
        try:
            return await self._serve(request, timeout, priority, trace, stream)
        finally:
            _current.reset(token)

    @overload
    def serve(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: Literal[False] = False,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> Coroutine[Any, Any, ResponseT]: ...

    @overload
    def serve(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: Literal[True],
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> Coroutine[Any, Any, Traced[ResponseT, TraceT]]: ...

    @overload
    def serve(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> Coroutine[Any, Any, ResponseT | Traced[ResponseT, TraceT]]: ...

    def serve(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> Coroutine[Any, Any, Any]:
        """Serve one request. Await it.

        Callable from any thread or event loop; from another loop the call is
        forwarded to this one's own.

        Args:
            request: the request, as the model's ``preprocess`` (or the
                pipeline's first node) takes it.
            timeout: this request's deadline in seconds from now; defaults
                to the configured one. When it passes the caller gets
                :class:`DeadlineExceeded` at once; a request whose deadline
                passed before its batch started is never computed.
            priority: its priority level (0 is the highest); defaults to
                the configured one.
            trace: return a :class:`Traced` with the response and where the
                call's time went.
            sequence_id: for a stateful model (or a pipeline with one), the
                sequence this request is a step of: a non-zero integer or a
                non-empty string. See :doc:`/stateful`.
            sequence_start: it is the sequence's first step.
            sequence_end: it is the sequence's last step.

        Returns:
            The response (in a :class:`Traced` with ``trace=True``).

        Raises:
            NotReady: it is not ready; the message names the state.
            Overloaded: the request's priority level is full.
            InvalidInput: ``preprocess`` rejected the request (or its cost or
                priority cannot be batched); or its sequence flags do not fit
                (a stateless model, a start for a live sequence, a step for
                one that is not live).
            DeadlineExceeded: the deadline passed first.
            InferenceError: ``infer`` or ``postprocess`` failed for it.

        Added in 0.3 (the name; ``infer`` before); the sequence keywords in 0.5.
        """
        # A plain def handing back the request path's coroutine, so that a
        # request makes one coroutine fewer: about 5% of the batcher's cost
        # per request (benchmarks/batcher.py). Awaiting it is all callers see.
        # The at-home check is Home.call's, inlined: a call fewer a request.
        home = self._home
        if sequence_id is not None or sequence_start or sequence_end:
            flags = (sequence_id, sequence_start, sequence_end)
            return home.call(self._serve_step, flags, request, timeout, priority, trace, False)
        if home.thread == _get_ident() or home.portal is None:
            return self._serve(request, timeout, priority, trace, False)
        return home.call(self._serve, request, timeout, priority, trace, False)

    @overload
    def serve_sync(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: Literal[False] = False,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> ResponseT: ...

    @overload
    def serve_sync(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: Literal[True],
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> Traced[ResponseT, TraceT]: ...

    @overload
    def serve_sync(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> ResponseT | Traced[ResponseT, TraceT]: ...

    def serve_sync(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> ResponseT | Traced[ResponseT, TraceT]:
        """Blocking form of :meth:`serve`, for threads without an event loop.

        Thread-safe. Works from a thread that runs its own loop (a notebook)
        as long as this lives in another one (started with ``start_sync``).

        Added in 0.3 (the name; ``infer_sync`` before).
        """
        flags = (sequence_id, sequence_start, sequence_end)
        result: ResponseT | Traced[ResponseT, TraceT] = self._home.call_sync(
            self._serve_step, flags, request, timeout, priority, trace, False
        )
        return result

    def stream(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> AsyncIterator[Any]:
        """Serve one request and yield its response in chunks, as they are made.

        For a handler whose ``postprocess`` is a generator (``def`` or
        ``async def`` with ``yield``): the request is batched and computed
        like any other, then each value ``postprocess`` yields for it comes
        out here at once. (:meth:`serve` on such a model returns the list of
        all chunks.) A model whose ``postprocess`` does not yield, and a
        pipeline, give the whole response as one chunk. The deadline covers
        the whole stream; leaving the loop early closes ``postprocess``'s
        generator.

        Callable from any event loop; from another loop each chunk is
        fetched from this one's own.

        Raises:
            MdsError: what :meth:`serve` raises, before the first chunk or,
                for ``postprocess``'s errors, between chunks.

        Added in 0.2.
        """
        flags = (sequence_id, sequence_start, sequence_end)
        return self._home.iterate(self._serve_step, flags, request, timeout, priority, False, True)

    def stream_sync(
        self,
        request: RequestT,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        sequence_id: int | str | None = None,
        sequence_start: bool = False,
        sequence_end: bool = False,
    ) -> Iterator[Any]:
        """Blocking form of :meth:`stream`, for threads without an event loop (Flask).

        The request is sent when iteration begins; closing the iterator early
        stops the stream.
        """
        flags = (sequence_id, sequence_start, sequence_end)
        return self._home.iterate_sync(
            self._serve_step, flags, request, timeout, priority, False, True
        )

    def serve_many(
        self,
        requests: Sequence[RequestT],
        *,
        timeout: float | None = None,
        priority: int | None = None,
    ) -> Coroutine[Any, Any, list[ResponseT | MdsError]]:
        """Serve several requests at once: they batch together. Await it.

        Returns:
            Per request, in order: its response, or the :class:`MdsError` it
            failed with (one failing request does not fail the others).

        Added in 0.3.
        """
        return self._home.call(self._serve_many, list(requests), timeout, priority)

    async def _serve_many(
        self, requests: list[Any], timeout: float | None, priority: int | None
    ) -> list[Any]:
        outcomes: list[Any] = [None] * len(requests)

        async def one(index: int) -> None:
            try:
                request = requests[index]
                outcomes[index] = await self._serve(request, timeout, priority, False, False)
            except MdsError as exc:
                outcomes[index] = exc

        async with anyio.create_task_group() as tasks:
            for index in range(len(requests)):
                tasks.start_soon(one, index)
        return outcomes

    def serve_many_sync(
        self,
        requests: Sequence[RequestT],
        *,
        timeout: float | None = None,
        priority: int | None = None,
    ) -> list[ResponseT | MdsError]:
        """Blocking form of :meth:`serve_many`, for threads without an event loop.

        Added in 0.3.
        """
        result: list[ResponseT | MdsError] = self._home.call_sync(
            self._serve_many, list(requests), timeout, priority
        )
        return result

    def health(self) -> Coroutine[Any, Any, HealthT]:
        """Readiness now, with the reason when not ready. Await it.

        Callable from any event loop.
        """
        return self._home.call(self._health)

    def health_sync(self) -> HealthT:
        """Blocking form of :meth:`health`, for threads without an event loop.

        Added in 0.3.
        """
        if self._home.portal is None:  # not running: nothing to ask its loop
            result: HealthT = process_portal().call(self._health)
            return result
        return self._home.call_sync(self._health)
