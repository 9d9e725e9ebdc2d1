"""The exception hierarchy, and where an error happened as data.

::

    MdsError
        ConfigError(MdsError, ValueError)          bad config or pipeline spec; names the path
        RequestError                               this request's fault (4xx)
            DecodeError                            the request's bytes could not be decoded
            InvalidInput(RequestError, ValueError) decoded, but not valid input for the model
            ModelNotFound(RequestError, LookupError)   no such model, pipeline or version
        Unavailable                                try again later (503)
            Overloaded                             the queue is full (429)
            NotReady                               loading, failed, draining or stopped
        DeadlineExceeded(MdsError, TimeoutError)   the deadline passed first (504)
        InferenceError                             infer or postprocess failed (500)
        DeviceError                                a device is missing or failed
        LifecycleError(MdsError, RuntimeError)     a failed start, or a misuse
        MissingDependency(MdsError, ImportError)   names the extra to install

Where an error happened is data, not text: the boundary that knows the
model, version, pipeline, node or instance fills it in with
:meth:`MdsError.add_context`, and the message and the transports' error
bodies are rendered from those fields. An error a handler raises gets the
same context as one mds raises. Transports map the classes to their own
status codes; the core knows none.
"""

from __future__ import annotations

import reprlib
from typing import Any, Self

__all__ = [
    "ConfigError",
    "DeadlineExceeded",
    "DecodeError",
    "DeviceError",
    "InferenceError",
    "InvalidInput",
    "LifecycleError",
    "MdsError",
    "MissingDependency",
    "ModelNotFound",
    "NotReady",
    "Overloaded",
    "RequestError",
    "Unavailable",
    "describe",
    "excerpt",
    "quote",
]

#: The most characters of a value (or of a wrapped error's text) an error quotes.
EXCERPT = 200


class MdsError(Exception):
    """Root of every error raised by mds.

    Catch this to handle anything mds raises. The message says what went
    wrong, where and, where there is one, what to do; ``where`` is also
    in the fields below (``None`` where it does not apply), filled in by
    the boundary that knows it.

    Args:
        message: what went wrong (without where: that is rendered from the fields).
        model: the model's name.
        version: the model's version.
        pipeline: the pipeline's name.
        node: the pipeline node's name.
        instance: the model instance's index.

    Added in 0.1; the fields in 0.3.
    """

    model: str | None = None
    version: str | None = None
    pipeline: str | None = None
    node: str | None = None
    instance: int | None = None

    def __init__(
        self,
        message: str = "",
        *,
        model: str | None = None,
        version: str | None = None,
        pipeline: str | None = None,
        node: str | None = None,
        instance: int | None = None,
    ) -> None:
        super().__init__(message)
        self.add_context(
            model=model, version=version, pipeline=pipeline, node=node, instance=instance
        )

    @property
    def message(self) -> str:
        """What went wrong, without where."""
        return str(self.args[0]) if self.args else ""

    def add_context(
        self,
        *,
        model: str | None = None,
        version: str | None = None,
        pipeline: str | None = None,
        node: str | None = None,
        instance: int | None = None,
    ) -> Self:
        """Fill in where the error happened; fields already known are kept.

        Returns the error itself, for ``raise exc.add_context(...)``.
        """
        if model is not None and self.model is None:
            self.model = model
        if version is not None and self.version is None:
            self.version = version
        if pipeline is not None and self.pipeline is None:
            self.pipeline = pipeline
        if node is not None and self.node is None:
            self.node = node
        if instance is not None and self.instance is None:
            self.instance = instance
        return self

    def context(self) -> dict[str, Any]:
        """The known fields of where it happened, by name."""
        fields = {
            "pipeline": self.pipeline,
            "node": self.node,
            "model": self.model,
            "version": self.version,
            "instance": self.instance,
        }
        return {key: value for key, value in fields.items() if value is not None}

    @property
    def where(self) -> str:
        """Where it happened, in words: ``"pipeline 'p', node 'n', model 'm' (version 1)"``."""
        parts = []
        if self.pipeline is not None:
            parts.append(f"pipeline {self.pipeline!r}")
        if self.node is not None:
            parts.append(f"node {self.node!r}")
        if self.model is not None:
            version = f" (version {self.version})" if self.version is not None else ""
            parts.append(f"model {self.model!r}{version}")
        if self.instance is not None:
            parts.append(f"instance {self.instance}")
        return ", ".join(parts)

    def __str__(self) -> str:
        where = self.where
        message = self.message
        return f"{where}: {message}" if where and message else where or message


class ConfigError(MdsError, ValueError):
    """A configuration or pipeline spec is invalid; the message names the path."""


class RequestError(MdsError):
    """The request itself is at fault; other requests are unaffected."""


class DecodeError(RequestError):
    """The request's bytes could not be decoded."""


class InvalidInput(RequestError, ValueError):
    """The request was decoded but is not valid input for the model.

    Raised when a handler's ``preprocess`` rejects a request. Handlers may
    raise it themselves to give a precise message.
    """


class ModelNotFound(RequestError, LookupError):
    """The request names a model (or version) that is not there."""


class Unavailable(MdsError):
    """The service cannot take this request now; trying again later may work."""


class Overloaded(Unavailable):
    """The model's queue is full; the request was rejected at once."""


class NotReady(Unavailable):
    """The model (or runtime) is not in a state that takes requests.

    The message names the state, and for a failed model, the reason.
    """


class DeadlineExceeded(MdsError, TimeoutError):
    """The request's deadline passed before it was answered."""


class InferenceError(MdsError):
    """The model failed while computing this request (infer or postprocess)."""


class DeviceError(MdsError):
    """A device is missing or failed."""


class LifecycleError(MdsError, RuntimeError):
    """A lifecycle step failed, or an operation is not allowed in this state.

    Raised when ``init`` or warm-up fails (the cause is chained), when a model
    is started twice, or when a blocking call is made from the event-loop
    thread that would have to answer it.
    """


class MissingDependency(MdsError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


def excerpt(text: str, limit: int = EXCERPT) -> str:
    """``text`` if short, else its start and its size: what an error may quote."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text):,} characters in all)"


_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict = 3, 8, 8
_repr.maxstring = _repr.maxother = EXCERPT


def quote(value: Any) -> str:
    """``repr(value)``, bounded (never built whole): for a message that quotes a client's value."""
    try:
        return excerpt(_repr.repr(value))
    except Exception:  # pragma: no cover - a repr that fails
        return f"<{type(value).__name__}>"


def describe(exc: BaseException) -> str:
    """``"Type: message"`` for an exception, its text bounded (an mds error's without where)."""
    text = exc.message if isinstance(exc, MdsError) else str(exc)
    return f"{type(exc).__name__}: {excerpt(text)}"
