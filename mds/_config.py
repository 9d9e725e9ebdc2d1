"""Serving configuration: typed, frozen, validated both when decoded and when built."""

# No `from __future__ import annotations`: msgspec reads these annotations at
# run time, and mds/__init__.py gives the classes the public module "mds".

import contextvars
import re
from collections.abc import Iterable
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from ._devices.device import Device
from ._errors import ConfigError

__all__ = [
    "BatchingConfig",
    "ModelConfig",
    "SequenceConfig",
    "VersionPolicy",
    "check_name",
    "queue_limits",
    "version_key",
    "warmup_sizes",
]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(name: str, what: str = "model") -> str:
    """``name``, if it may name a model, pipeline or node; else :class:`ConfigError`."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{what} name {name!r} is not allowed: use letters, digits, '_', '.' "
            "and '-', starting with a letter or digit"
        )
    return name


def is_name(name: str) -> bool:
    """Whether ``name`` may name a model."""
    return bool(_NAME.match(name))


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

    Sizes count *cost*: by default each request costs 1, and a handler can
    give each item its own cost (tokens, pixels, rows) with
    :meth:`ModelHandler.cost`, so a batch never holds more than the model
    can take.

    Attributes:
        max_batch_size: the most cost one ``infer`` call receives.
        max_queue_delay: how long, in seconds, a batch may wait to grow
            towards a preferred size (or ``max_batch_size``) while the model
            is busy. An idle model never waits: a lone request goes at once
            (unless ``wait_when_idle``).
        wait_when_idle: let a batch wait its ``max_queue_delay`` at an idle
            model too, as Triton's, TorchServe's and Ray Serve's batchers
            do: larger batches where callers are many but slow to arrive,
            at the cost of a lone request's latency. Added in 0.5.
        delay_from: where ``max_queue_delay`` counts from: ``"oldest"``,
            the arrival of the oldest request in the batch (Triton's
            batcher), or ``"start"``, the moment an instance takes the
            batch's first request (Ray Serve's ``@serve.batch`` and
            TorchServe's): a request that queued while the model computed
            then waits that time as well, and batches grow larger under
            load. Added in 0.5.
        preferred_batch_sizes: sizes the batcher forms when it can; a batch
            that reaches one of them goes at once.
        max_queue_size: the most requests waiting at each priority level; a
            request that finds its level full fails at once with
            :class:`mds.Overloaded`.
        priority_queue_sizes: one limit per priority level, instead of
            ``max_queue_size`` for all.
        priority_levels: how many priority levels there are; 0 is the
            highest, and a batch takes higher levels first.
        default_priority: the level of a request that names none.
        isolate_failures: when ``infer`` (or collation) raises for a batch,
            split the batch and retry the halves to find the item(s) at
            fault, so the others still get results.

    Example:
        >>> mds.BatchingConfig(max_batch_size=32, max_queue_delay=0.002,
        ...                    preferred_batch_sizes=(8, 16))

    Added in 0.1.
    """

    max_batch_size: Annotated[int, Meta(ge=1)] = 1
    max_queue_delay: Annotated[float, Meta(ge=0.0)] = 0.0
    wait_when_idle: bool = False
    delay_from: Literal["oldest", "start"] = "oldest"
    preferred_batch_sizes: tuple[Annotated[int, Meta(ge=1)], ...] = ()
    max_queue_size: Annotated[int, Meta(ge=1)] = 1024
    priority_queue_sizes: tuple[Annotated[int, Meta(ge=1)], ...] = ()
    priority_levels: Annotated[int, Meta(ge=1)] = 1
    default_priority: Annotated[int, Meta(ge=0)] = 0
    isolate_failures: bool = True

    def _check(self) -> None:
        for size in self.preferred_batch_sizes:
            if size > self.max_batch_size:
                raise ConfigError(
                    f"BatchingConfig.preferred_batch_sizes: {size} is larger than "
                    f"max_batch_size ({self.max_batch_size})"
                )
        if self.priority_queue_sizes and len(self.priority_queue_sizes) != self.priority_levels:
            raise ConfigError(
                f"BatchingConfig.priority_queue_sizes: {len(self.priority_queue_sizes)} "
                f"limits for {self.priority_levels} priority levels; give one per level"
            )
        if self.default_priority >= self.priority_levels:
            raise ConfigError(
                f"BatchingConfig.default_priority: {self.default_priority} is not a level "
                f"(levels are 0 to {self.priority_levels - 1})"
            )


class SequenceConfig(_Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A stateful model's sequences: how many, how long they may idle, where they run.

    Setting :attr:`ModelConfig.sequences` makes a model stateful: each
    request is one step of a sequence (see :doc:`/stateful`).

    Attributes:
        max_sequences: the most sequences live at once; a start beyond it
            is :class:`mds.Overloaded`.
        idle_timeout: seconds a live sequence may go without a step before
            it ends (reason ``idle``).
        max_queued_steps: the most steps of one sequence waiting at once
            (behind the one being computed); one more is :class:`mds.Overloaded`.
        pinned: each sequence runs all its steps on the instance that
            started it (Triton's "direct" strategy), for state kept on a
            device; otherwise any instance computes any step ("oldest").
        on_stop: what a stop, reload or unload does with live sequences:
            ``"end"`` them at once, or ``"drain"``: take their steps (no
            new starts) until each ends or ``ModelConfig.drain_timeout`` passes.

    Example:
        >>> mds.ModelConfig(sequences=mds.SequenceConfig(idle_timeout=30.0))

    Added in 0.5.
    """

    max_sequences: Annotated[int, Meta(ge=1)] = 1000
    idle_timeout: Annotated[float, Meta(gt=0.0)] = 60.0
    max_queued_steps: Annotated[int, Meta(ge=1)] = 16
    pinned: bool = False
    on_stop: Literal["end", "drain"] = "end"


class ModelConfig(_Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one model is served: instances, devices, batching, timeouts.

    Serving policy lives here, never in a handler's constructor. Durations
    are float seconds.

    Attributes:
        instances: how many copies of the handler serve from one queue.
        devices: where instances run: device names (``"cpu"``,
            ``"cuda:1"``), a kind alone for every device of that kind
            (``"cuda"``), or ``"auto"`` for every visible GPU, else the CPU.
            One name or a tuple of names; see :doc:`/devices`.
        placement: how instances are spread over those devices:
            ``"round_robin"`` (instance ``i`` on device ``i`` modulo their
            number, shifted by the worker index) or ``"memory"`` (each
            instance on the device with the most free memory, checked
            against ``instance_memory`` or, if that is not given, against
            what the first instance was measured to take).
        instance_memory: the bytes one instance needs on its device, for
            ``placement="memory"``.
        cpu_threads: the intra-op threads each CPU instance may use; ``None``
            divides the usable cores among the model's CPU instances.
        cpu_fallback: place instances on the CPU when a named device is not
            there, with a warning, instead of failing the start.
        batching: queueing and batch formation.
        timeout: default deadline for each request, in seconds; ``None`` for
            no deadline. A request may give its own.
        drain_timeout: on stop, how long in-flight requests may take to
            finish, in seconds, before they are failed.
        health_timeout: the longest a handler's ``health`` check may take, in
            seconds, before the model counts as not ready.
        warmup_batch_sizes: the batch sizes warm-up runs; ``None`` means
            1, the preferred sizes, and ``batching.max_batch_size``.
        worker_threads: how many threads run this model's plain (non-async)
            ``preprocess``, ``postprocess`` and ``health`` calls at once.
        parameters: free-form settings for the handler, given to it in
            :attr:`mds.ModelContext.parameters`.
        sequences: makes the model stateful: requests are steps of
            sequences that share state (see :class:`SequenceConfig`);
            ``None`` (the default) for a stateless model. Added in 0.5.

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
    devices: str | Annotated[tuple[str, ...], Meta(min_length=1)] = ("cpu",)
    placement: Literal["round_robin", "memory"] = "round_robin"
    instance_memory: Annotated[int, Meta(ge=1)] | None = None
    cpu_threads: Annotated[int, Meta(ge=1)] | None = None
    cpu_fallback: bool = False
    batching: BatchingConfig = msgspec.field(default_factory=BatchingConfig)
    timeout: Annotated[float, Meta(gt=0.0)] | None = None
    drain_timeout: Annotated[float, Meta(ge=0.0)] = 30.0
    health_timeout: Annotated[float, Meta(gt=0.0)] = 5.0
    warmup_batch_sizes: tuple[Annotated[int, Meta(ge=1)], ...] | None = None
    worker_threads: Annotated[int, Meta(ge=1)] = 8
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    sequences: SequenceConfig | None = None

    def _check(self) -> None:
        if isinstance(self.devices, str):
            msgspec.structs.force_setattr(self, "devices", (self.devices,))
        for index, name in enumerate(self.devices):
            if name == "auto":
                continue
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


def version_key(version: str) -> tuple[int, int, str]:
    """How versions order: numbers by value, below any other string, which go by text."""
    return (0, int(version), "") if version.isdecimal() else (1, 0, version)


class VersionPolicy(_Config, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which of a model's versions stay loaded; Triton's ``version_policy``.

    Give one of the three; with none, ``latest=1``. A version that takes
    traffic stays loaded whatever the policy says (see
    :meth:`Runtime.set_traffic`). Versions order numerically where they are
    numbers, else by their text, numbers first.

    Attributes:
        latest: keep the ``latest`` highest versions.
        specific: keep only these versions.
        all: keep every version loaded.

    Example:
        >>> mds.VersionPolicy(latest=2)  # the new one and the one before
        >>> mds.VersionPolicy(specific=("1", "3"))

    Added in 0.4.
    """

    latest: Annotated[int, Meta(ge=1)] | None = None
    specific: Annotated[tuple[str | int, ...], Meta(min_length=1)] | None = None
    all: bool = False

    def _check(self) -> None:
        given = [self.latest is not None, self.specific is not None, self.all]
        if sum(given) > 1:
            raise ConfigError("VersionPolicy: give one of latest, specific and all, not several")
        if not any(given):
            msgspec.structs.force_setattr(self, "latest", 1)
        if self.specific is not None:
            versions = tuple(str(v) for v in self.specific)
            msgspec.structs.force_setattr(self, "specific", versions)

    def keeps(self, versions: Iterable[str]) -> set[str]:
        """Which of ``versions`` this policy keeps loaded."""
        found = set(versions)
        if self.all:
            return found
        if self.specific is not None:
            return found & {str(v) for v in self.specific}
        assert self.latest is not None
        return set(sorted(found, key=version_key)[-self.latest :])

    def __str__(self) -> str:
        if self.all:
            return "all"
        if self.specific is not None:
            return f"specific {', '.join(str(v) for v in self.specific)}"
        return f"latest {self.latest}"


def queue_limits(batching: BatchingConfig) -> tuple[int, ...]:
    """The queue limit of each priority level."""
    return batching.priority_queue_sizes or (batching.max_queue_size,) * batching.priority_levels


def warmup_sizes(config: ModelConfig) -> tuple[int, ...]:
    """The batch sizes warm-up runs, smallest first."""
    if config.warmup_batch_sizes is not None:
        return tuple(sorted(set(config.warmup_batch_sizes)))
    batching = config.batching
    return tuple(sorted({1, *batching.preferred_batch_sizes, batching.max_batch_size}))
