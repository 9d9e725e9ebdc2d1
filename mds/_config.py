"""Serving configuration: typed, frozen, validated both when decoded and when built."""

# No `from __future__ import annotations`: msgspec reads these annotations at
# run time, and mds/__init__.py gives the classes the public module "mds".

import contextvars
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from ._devices.device import Device
from ._errors import ConfigError

__all__ = ["BatchingConfig", "ModelConfig"]

# Set while a config re-validates itself, so the copy it builds does not recurse.
_validating: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "mds_config_validating", default=False
)


class _Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of config structs.

    msgspec checks types and ``Meta`` bounds only when it decodes or converts.
    Building a config in Python skips those checks, so ``__post_init__`` runs
    the same conversion on the fields and keeps the converted values (so an
    ``int`` given for a ``float`` becomes a float, a list for a tuple a tuple).
    """

    def __post_init__(self) -> None:
        if _validating.get():
            return  # the copy made below; the original checks itself
        token = _validating.set(True)
        try:
            checked = msgspec.convert(msgspec.structs.asdict(self), type(self))
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid {type(self).__name__}: {exc}") from None
        finally:
            _validating.reset(token)
        for field in self.__struct_fields__:
            msgspec.structs.force_setattr(self, field, getattr(checked, field))
        self._check()

    def _check(self) -> None:
        """Rules that span several fields; raise :class:`ConfigError`."""


class BatchingConfig(_Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a model's requests are queued and grouped into batches.

    Attributes:
        max_batch_size: the most items one ``infer`` call receives.
        max_queue_size: the most requests waiting in the queue; a request that
            arrives when it is full fails at once with :class:`mds.Overloaded`.

    Example:
        >>> mds.BatchingConfig(max_batch_size=32, max_queue_size=256)

    Added in 0.1.
    """

    max_batch_size: Annotated[int, Meta(ge=1)] = 1
    max_queue_size: Annotated[int, Meta(ge=1)] = 1024


class ModelConfig(_Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one model is served: instances, devices, batching, timeouts.

    Serving policy lives here, never in a handler's constructor. Durations
    are float seconds.

    Attributes:
        instances: how many copies of the handler serve from one queue.
        devices: device names (``"cpu"``, ``"cuda:0"``, ...); instance ``i``
            is placed on ``devices[i % len(devices)]``.
        batching: queueing and batch formation.
        timeout: default deadline for each request, in seconds; ``None`` for
            no deadline. A request may give its own.
        drain_timeout: on stop, how long in-flight requests may take to
            finish, in seconds, before they are failed.
        health_timeout: the longest a handler's ``health`` check may take, in
            seconds, before the model counts as not ready.
        warmup_batch_sizes: the batch sizes warm-up runs; ``None`` means
            1 and ``batching.max_batch_size``.
        worker_threads: how many threads run this model's plain (non-async)
            ``preprocess``, ``postprocess`` and ``health`` calls at once.
        parameters: free-form settings for the handler, given to it in
            :attr:`mds.ModelContext.parameters`.

    Example:
        >>> mds.ModelConfig(
        ...     instances=2,
        ...     batching=mds.BatchingConfig(max_batch_size=16),
        ...     timeout=1.5,
        ...     parameters={"threshold": 0.5},
        ... )

    Added in 0.1.
    """

    instances: Annotated[int, Meta(ge=1)] = 1
    devices: Annotated[tuple[str, ...], Meta(min_length=1)] = ("cpu",)
    batching: BatchingConfig = msgspec.field(default_factory=BatchingConfig)
    timeout: Annotated[float, Meta(gt=0.0)] | None = None
    drain_timeout: Annotated[float, Meta(ge=0.0)] = 30.0
    health_timeout: Annotated[float, Meta(gt=0.0)] = 5.0
    warmup_batch_sizes: tuple[Annotated[int, Meta(ge=1)], ...] | None = None
    worker_threads: Annotated[int, Meta(ge=1)] = 8
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)

    def _check(self) -> None:
        for index, name in enumerate(self.devices):
            try:
                Device.parse(name)
            except ValueError as exc:
                raise ConfigError(f"ModelConfig.devices[{index}]: {exc}") from None
        for size in self.warmup_batch_sizes or ():
            if size > self.batching.max_batch_size:
                raise ConfigError(
                    f"ModelConfig.warmup_batch_sizes: {size} is larger than "
                    f"batching.max_batch_size ({self.batching.max_batch_size}); "
                    "the batcher never forms such a batch"
                )

    def _device_for(self, instance: int) -> Device:
        """The device that instance number ``instance`` is placed on."""
        return Device.parse(self.devices[instance % len(self.devices)])

    def _warmup_sizes(self) -> tuple[int, ...]:
        """The batch sizes warm-up runs, smallest first."""
        if self.warmup_batch_sizes is not None:
            return tuple(sorted(set(self.warmup_batch_sizes)))
        return tuple(sorted({1, self.batching.max_batch_size}))
