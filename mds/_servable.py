"""The one contract that the runtime and every transport serve through.

Models and pipelines (and, next, a model's versions) implement it; a
transport never asks which kind it holds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from typing import Any, Protocol

from ._errors import MdsError
from ._handler import ModelState
from ._status import ModelHealth, PipelineHealth
from ._tensors import Signature

__all__ = ["Servable", "Signature"]


class Servable(Protocol):
    """What a runtime serves by name: a :class:`ModelRuntime` or a :class:`PipelineRuntime`.

    Every call is callable from any thread or event loop: it is forwarded
    to the loop the servable lives in when need be.

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

    def serve(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
        trace: bool = False,
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
    ) -> Any:
        """Blocking form of :meth:`serve`, for threads with no event loop."""
        ...

    def stream(
        self, request: Any, *, timeout: float | None = None, priority: int | None = None
    ) -> AsyncIterator[Any]:
        """Serve one request and yield its response in chunks."""
        ...

    def stream_sync(
        self, request: Any, *, timeout: float | None = None, priority: int | None = None
    ) -> Iterator[Any]:
        """Blocking form of :meth:`stream`."""
        ...

    def health(self) -> Awaitable[ModelHealth | PipelineHealth]:
        """Readiness now, with the reason when not ready. Await it."""
        ...
