"""The exception hierarchy.

Every error mds raises derives from :class:`MdsError`. Transports map these
classes to their own status codes; the core knows none.
"""

from __future__ import annotations

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
]


class MdsError(Exception):
    """Root of every error raised by mds.

    Catch this to handle anything mds raises. The message says what went
    wrong, where (model, item, config path) and, where there is one, what to do.
    """


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
