"""Helpers for testing your own handlers, in pytest or a notebook.

Both helpers are plain functions: call them from sync code, from a test, or
from a notebook cell while its event loop runs. They run the handler in
mds's background event loop through the same code that serves requests.

Example:
    >>> report = mds.testing.run_lifecycle(Classifier, images, batch_size=8)
    >>> report.raise_errors()
    >>> mds.testing.assert_batch_invariant(Classifier, images, atol=1e-5)

Added in 0.1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic

import anyio
import msgspec
import numpy as np

from ._bridge import process_portal
from ._config import ModelConfig
from ._errors import MdsError
from ._handler import ModelHandler, ModelState, RequestT, ResponseT
from ._model import ModelRuntime
from ._status import ModelHealth

__all__ = ["LifecycleReport", "assert_batch_invariant", "run_lifecycle"]

Handler = ModelHandler[RequestT, ResponseT] | Callable[[], ModelHandler[RequestT, ResponseT]]


@dataclasses.dataclass(frozen=True)
class LifecycleReport(Generic[ResponseT]):
    """What :func:`run_lifecycle` saw.

    Attributes:
        outputs: per input, its response, or ``None`` where it failed.
        errors: per input, its error, or ``None`` where it succeeded.
        states: the lifecycle states the model went through, in order.
        health: the model's health once it was ready.
        timings: seconds spent in each step: ``init``, ``warmup``,
            ``preprocess``, ``infer``, ``postprocess`` (all batches) and
            ``teardown``.
        batch_sizes: the size of each batch ``infer`` was given.

    Added in 0.1.
    """

    outputs: list[ResponseT | None]
    errors: list[BaseException | None]
    states: list[ModelState]
    health: ModelHealth
    timings: dict[str, float]
    batch_sizes: list[int]

    @property
    def ok(self) -> bool:
        """Whether every input got a response."""
        return all(error is None for error in self.errors)

    def raise_errors(self) -> None:
        """Raise the first input's error, if any input failed.

        Raises:
            Exception: the first error, with its index added as a note.
        """
        for index, error in enumerate(self.errors):
            if error is not None:
                error.add_note(f"(input {index} of {len(self.errors)})")
                raise error


def run_lifecycle(
    handler: Handler[RequestT, ResponseT],
    inputs: Iterable[RequestT],
    *,
    batch_size: int | None = None,
    config: ModelConfig | None = None,
) -> LifecycleReport[ResponseT]:
    """Run a handler's whole lifecycle on ``inputs`` and report what happened.

    init → warm-up → health → preprocess / infer / postprocess on consecutive
    batches of ``inputs`` → teardown, on one instance, through the code that
    serves requests. An input that fails does not stop the others.

    Args:
        handler: a handler object or a factory (such as its class).
        inputs: requests, as callers would send them.
        batch_size: how many inputs go into each ``infer`` call; defaults to
            the config's ``max_batch_size``.
        config: the model config; its ``instances`` is ignored (one is run).

    Returns:
        Outputs, per-input errors, states, health, step timings, batch sizes.

    Raises:
        LifecycleError: ``init`` or warm-up failed (the cause is chained).
    """
    requests = list(inputs)
    model, size = _model(handler, config, batch_size)
    return process_portal().call(_run_lifecycle, model, requests, size)


def assert_batch_invariant(
    handler: Handler[RequestT, ResponseT],
    inputs: Iterable[RequestT],
    *,
    batch_size: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    config: ModelConfig | None = None,
) -> None:
    """Assert that results computed in batches equal those computed one by one.

    Starts the handler once, computes every input alone (batches of one) and
    then in batches of ``batch_size``, and compares the responses: arrays and
    tensors with ``numpy.allclose(rtol, atol)``, through dicts, lists and
    tuples; anything else with ``==``. An input must fail in both ways or in
    neither.

    Args:
        handler: a handler object or a factory (such as its class).
        inputs: requests, as callers would send them.
        batch_size: the batch size to compare against; defaults to all inputs
            in one batch.
        rtol: relative tolerance for numbers.
        atol: absolute tolerance for numbers.
        config: the model config.

    Raises:
        AssertionError: some inputs differ; the message lists each one with
            where and by how much.
        LifecycleError: ``init`` or warm-up failed.
    """
    requests = list(inputs)
    size = batch_size if batch_size is not None else max(1, len(requests))
    model, size = _model(handler, config, size)
    alone, batched = process_portal().call(_both_ways, model, requests, size)
    problems = [
        f"  item {index}: {problem}"
        for index, (a, b) in enumerate(zip(alone, batched, strict=True))
        if (problem := _difference(b, a, rtol, atol)) is not None
    ]
    if problems:
        raise AssertionError(
            f"batched results differ from one-by-one results for {len(problems)} of "
            f"{len(requests)} inputs (batch size {size}, rtol={rtol:g}, atol={atol:g}):\n"
            + "\n".join(problems)
        )


def _model(
    handler: Handler[Any, Any], config: ModelConfig | None, batch_size: int | None
) -> tuple[ModelRuntime[Any, Any], int]:
    config = config if config is not None else ModelConfig()
    size = batch_size if batch_size is not None else config.batching.max_batch_size
    batching = config.batching
    if size > batching.max_batch_size:
        batching = msgspec.structs.replace(batching, max_batch_size=size)
    config = msgspec.structs.replace(config, instances=1, batching=batching)
    return ModelRuntime(handler, config), size


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def _run_lifecycle(
    model: ModelRuntime[Any, Any], requests: list[Any], size: int
) -> LifecycleReport[Any]:
    states: list[ModelState] = [model.state]
    watch_states(model, lambda state, reason: states.append(state))
    timings: dict[str, float] = {}
    outcomes: list[Any] = []
    batch_sizes: list[int] = []
    async with model:
        health = await model.health()
        for chunk in _chunks(requests, size):
            outcomes += await run_batch(model, list(chunk), timings=timings, sizes=batch_sizes)
        began = anyio.current_time()
    stats = model.statistics()
    timings = {
        "init": stats.init_seconds,
        "warmup": stats.warmup_seconds,
        **timings,
        "teardown": anyio.current_time() - began,
    }
    failed = [isinstance(o, BaseException) for o in outcomes]
    return LifecycleReport(
        outputs=[None if f else o for f, o in zip(failed, outcomes, strict=True)],
        errors=[o if f else None for f, o in zip(failed, outcomes, strict=True)],
        states=states,
        health=health,
        timings=timings,
        batch_sizes=batch_sizes,
    )


async def _both_ways(
    model: ModelRuntime[Any, Any], requests: list[Any], size: int
) -> tuple[list[Any], list[Any]]:
    async with model:
        alone = [(await run_batch(model, [r]))[0] for r in requests]
        batched: list[Any] = []
        for chunk in _chunks(requests, size):
            batched += await run_batch(model, list(chunk))
    return alone, batched


def _difference(batched: Any, alone: Any, rtol: float, atol: float, path: str = "") -> str | None:
    """How ``batched`` differs from ``alone``; ``None`` if they match."""
    where = f"at {path}: " if path else ""
    if isinstance(batched, BaseException) or isinstance(alone, BaseException):
        if isinstance(batched, BaseException) and isinstance(alone, BaseException):
            return None
        if isinstance(alone, BaseException):
            return f"{where}failed alone ({_describe(alone)}) but not in a batch"
        return f"{where}failed in a batch ({_describe(batched)}) but not alone"
    if isinstance(batched, Mapping) and isinstance(alone, Mapping):
        if set(batched) != set(alone):
            return f"{where}keys differ: batched {sorted(batched)} vs alone {sorted(alone)}"
        for key in alone:
            found = _difference(batched[key], alone[key], rtol, atol, f"{path}[{key!r}]")
            if found:
                return found
        return None
    if isinstance(batched, (list, tuple)) and isinstance(alone, (list, tuple)):
        if len(batched) != len(alone):
            return f"{where}lengths differ: batched {len(batched)} vs alone {len(alone)}"
        for index, (b, a) in enumerate(zip(batched, alone, strict=True)):
            found = _difference(b, a, rtol, atol, f"{path}[{index}]")
            if found:
                return found
        return None
    b, a = _as_array(batched), _as_array(alone)
    if b is not None and a is not None:
        return _array_difference(b, a, rtol, atol, where)
    if batched != alone:
        return f"{where}batched {batched!r} vs alone {alone!r}"
    return None


def _as_array(value: Any) -> np.ndarray[Any, Any] | None:
    """Numbers, arrays and tensors as numpy arrays; ``None`` for anything else."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    if isinstance(value, (bool, str, bytes)) or value is None:
        return None
    if isinstance(value, (int, float, complex, np.ndarray, np.generic)):
        array = np.asarray(value)
        return array if array.dtype.kind in "biufc" else None
    return None


def _array_difference(
    b: np.ndarray[Any, Any], a: np.ndarray[Any, Any], rtol: float, atol: float, where: str
) -> str | None:
    if b.shape != a.shape:
        return f"{where}shapes differ: batched {b.shape} vs alone {a.shape}"
    close = np.isclose(b, a, rtol=rtol, atol=atol, equal_nan=True)
    if close.all():
        return None
    if b.ndim == 0:
        return f"{where}batched {b.item()!r} vs alone {a.item()!r}"
    gap = np.where(close, 0.0, np.abs(b.astype(np.float64) - a.astype(np.float64)))
    worst = np.unravel_index(int(np.argmax(gap)), gap.shape)
    return (
        f"{where}{int((~close).sum())} of {close.size} values differ; worst at index "
        f"{tuple(int(i) for i in worst)}: batched {b[worst].item()!r} vs alone "
        f"{a[worst].item()!r} (difference {gap[worst]:.3g})"
    )


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# -- the internal API of mds.testing ---------------------------------------------


def watch_states(
    model: ModelRuntime[Any, Any], callback: Callable[[ModelState, str | None], None]
) -> None:
    """Call ``callback(state, reason)`` on each of ``model``'s state changes."""
    model._watchers.append(callback)


async def run_batch(
    model: ModelRuntime[Any, Any],
    requests: list[Any],
    *,
    timings: dict[str, float] | None = None,
    sizes: list[int] | None = None,
) -> list[Any]:
    """``requests`` as one batch made by hand, through the real path, on instance 0.

    No queue; per request, its response or its error (see
    :meth:`Instances.run_batch`), with the model in the error's context.
    """
    loaded = model._loaded
    if loaded is None or model.state is not ModelState.READY:
        raise model._refuse()
    outcomes = await loaded.run_batch(requests, timings=timings, sizes=sizes)
    for outcome in outcomes:
        if isinstance(outcome, MdsError):
            outcome.add_context(model=model.name, version=model.version)
    return outcomes
