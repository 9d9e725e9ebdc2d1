"""What a transport knows of the request being served, for the handler to read.

A transport (the protocol routes, the gRPC service) sets the request's
context around its call into the runtime. The caller's task runs
``preprocess`` and ``postprocess`` (or hands them to a thread or another
loop with a copy of its context), so they see it; ``infer`` serves a whole
batch and does not.
"""

# No `from __future__ import annotations`: msgspec reads these annotations.

import contextvars
from collections.abc import Mapping
from typing import Any

import msgspec

__all__ = ["RequestContext", "request_context", "use_request_context"]


class RequestContext(msgspec.Struct, frozen=True, kw_only=True):
    """What the caller sent beside the request itself.

    Attributes:
        id: the request's id: the protocol's ``id``, else an ``X-Request-Id``
            header; ``None`` when it has none.
        parameters: the request's protocol ``parameters``, but those mds acts
            on itself (``timeout``, ``priority``, ``binary_data_output``).
        outputs: the outputs the client asked for, by name, each with its
            own ``parameters``; empty when it asked for every output.
        sequence_id: for a stateful model, the sequence this request is a
            step of (the protocol's ``sequence_id``); ``None`` for none.
        sequence_start: whether it is the sequence's first step.
        sequence_end: whether it is the sequence's last step.

    Added in 0.5.
    """

    id: str | None = None
    parameters: Mapping[str, Any] = msgspec.field(default_factory=dict)
    outputs: Mapping[str, Mapping[str, Any]] = msgspec.field(default_factory=dict)
    sequence_id: int | str | None = None
    sequence_start: bool = False
    sequence_end: bool = False


class _Nothing(dict[str, Any]):
    """An empty dict that refuses changes: shared by every empty request."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__()

    def __reduce__(self) -> tuple[type[dict[str, Any]], tuple[()]]:
        return dict, ()  # a copy (copy, deepcopy, pickle) is the caller's own

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "this request came with no context: its empty parameters and outputs are "
            "shared by every such request and cannot be changed; set a RequestContext "
            "of your own with mds.use_request_context"
        )

    __setitem__ = __delitem__ = _refuse
    clear = pop = popitem = setdefault = update = __ior__ = _refuse


#: The context of a request with nothing in it: one instance, so that
#: transports can tell by identity that there is nothing to set. Its mappings
#: are read-only: a handler that wrote into them would write into every
#: other empty request's.
EMPTY_CONTEXT = RequestContext(parameters=_Nothing(), outputs=_Nothing())
_current: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "mds_request_context", default=EMPTY_CONTEXT
)


def request_context() -> RequestContext:
    """The context of the request being served, for ``preprocess`` and ``postprocess``.

    Outside a request, or for a request with no context (a plain
    ``mds.serve`` call), an empty one.

    Example:
        >>> def preprocess(self, request):
        ...     k = mds.request_context().parameters.get("top_k", 5)

    Added in 0.5.
    """
    return _current.get()


class use_request_context:
    """Serve the calls made inside the block with ``context``.

    What the transports do for each request; for your own routes, or tests
    of a handler that reads :func:`request_context`. (A class, not a
    generator: it runs on every protocol request.)

    Example:
        >>> with mds.use_request_context(mds.RequestContext(parameters={"top_k": 3})):
        ...     response = await runtime.serve("ranker", query)

    Added in 0.5.
    """

    __slots__ = ("_token", "context")

    def __init__(self, context: RequestContext) -> None:
        self.context = context

    def __enter__(self) -> RequestContext:
        self._token = _current.set(self.context)
        return self.context

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)
