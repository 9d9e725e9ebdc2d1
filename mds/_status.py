"""What callers can read about a model or a runtime: health and statistics."""

# No `from __future__ import annotations`: msgspec reads these annotations at
# run time, and mds/__init__.py gives the classes the public module "mds".

import msgspec

from ._handler import ModelState

__all__ = ["ModelHealth", "ModelStatistics", "RuntimeHealth"]


class ModelHealth(msgspec.Struct, frozen=True, kw_only=True):
    """One model's readiness.

    Attributes:
        name: the model's name.
        version: the model's version.
        state: its lifecycle state.
        ready: whether it takes requests now: ``READY`` and every instance's
            ``health`` check passed.
        reason: why it is not ready (the state, a failure's cause, a failed
            check); ``None`` when ready.

    Added in 0.1.
    """

    name: str
    version: str
    state: ModelState
    ready: bool
    reason: str | None = None


class RuntimeHealth(msgspec.Struct, frozen=True, kw_only=True):
    """A runtime's liveness and readiness, overall and per model.

    Attributes:
        live: the runtime is running (its event loop answers).
        ready: live, and every model is ready.
        models: each model's health, by name.

    Added in 0.1.
    """

    live: bool
    ready: bool
    models: dict[str, ModelHealth]


class ModelStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Counters for one model since it was created. Durations are seconds.

    Attributes:
        name: the model's name.
        version: the model's version.
        state: its lifecycle state now.
        in_flight: requests admitted and not yet answered.
        queued: requests waiting in the queue for a batch.
        requests: requests admitted (the model was ready).
        completed: requests answered with a result.
        failed: admitted requests answered with an error.
        rejected: requests refused at once: not ready, or the queue was full.
        cancelled: requests whose caller went away before the answer.
        errors: failed and rejected requests, by error class name.
        batches: ``infer`` calls made (warm-up included).
        batched_items: items in those calls.
        infer_seconds: time spent in ``infer``.
        init_seconds: time the last start spent in ``init``.
        warmup_seconds: time the last start spent in warm-up.

    Added in 0.1.
    """

    name: str
    version: str
    state: ModelState
    in_flight: int
    queued: int
    requests: int
    completed: int
    failed: int
    rejected: int
    cancelled: int
    errors: dict[str, int]
    batches: int
    batched_items: int
    infer_seconds: float
    init_seconds: float
    warmup_seconds: float

    @property
    def mean_batch_size(self) -> float:
        """Average items per ``infer`` call; 0 before the first."""
        return self.batched_items / self.batches if self.batches else 0.0
