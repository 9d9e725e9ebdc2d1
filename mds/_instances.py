"""A model's instances for one start: placed, initialised, warmed up, checked, torn down."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import anyio

from . import _logs
from ._config import ModelConfig, is_name, warmup_sizes
from ._devices.device import Device, DeviceInfo
from ._devices.manager import DeviceManager, Placer
from ._errors import ConfigError, DeviceError, LifecycleError, describe
from ._handler import ModelContext, ModelHandler, ModelState
from ._instance import Instance
from ._steps import Steps
from ._tensors import Signature
from ._threads import Threads, threads

__all__ = ["Instances", "Signature", "source_name", "start_instances"]

logger = logging.getLogger("mds.model")

Source = ModelHandler[Any, Any] | Callable[[], ModelHandler[Any, Any]]


class Instances:
    """One start of a model: its instances, its per-request steps, its shared threads.

    Attributes:
        instances: in index order.
        steps: the per-request steps, from the first instance's handler.
        signature: what the first handler's ``signature()`` said after ``init``.
        platform: the handler class's ``platform``.
        init_seconds: how long placing and ``init`` took.
        warmup_seconds: how long warm-up took.
    """

    def __init__(self, instances: list[Instance], steps: Steps, shared: Threads) -> None:
        self.instances = instances
        self.steps = steps
        self.shared = shared
        first = instances[0].handler
        self.handler = first
        self.signature: Signature | None = first.signature()
        self.platform: str = type(first).platform
        self.init_seconds = 0.0
        self.warmup_seconds = 0.0

    async def stop(self) -> None:
        """Tear every instance down (shielded), then let the threads go."""
        with anyio.CancelScope(shield=True):
            await _teardown(self.instances)
        _release(self.instances, self.shared)

    # -- warm-up and batches made by hand ------------------------------------

    async def warm_up(self, sizes: Sequence[int]) -> None:
        """Run each handler's examples through the real path at each of ``sizes``."""
        await _on_each(self.instances, functools.partial(self._warm_one, sizes))

    async def _warm_one(self, sizes: Sequence[int], instance: Instance) -> None:
        examples = await instance.warmup_examples()
        if not examples:
            return
        for size in sizes:
            requests = [examples[i % len(examples)] for i in range(size)]
            outcomes = await self.run_batch(requests, instance)
            for index, outcome in enumerate(outcomes):
                if isinstance(outcome, BaseException):
                    raise _StageError(
                        f"warm-up of instance {instance.index} at batch size {size} "
                        f"failed on example {index % len(examples)}: {describe(outcome)}"
                    ) from outcome

    async def run_batch(
        self,
        requests: Sequence[Any],
        instance: Instance | None = None,
        *,
        timings: dict[str, float] | None = None,
        sizes: list[int] | None = None,
    ) -> list[Any]:
        """The real path for a batch made by hand: per request, its response or error.

        Used by warm-up and by :mod:`mds.testing`: no queue, the same steps,
        collation and output checks. Requests that fail ``preprocess`` are
        left out of the batch. ``timings`` collects the seconds per step and
        ``sizes`` the size of the batch ``infer`` was given.
        """
        steps = self.steps
        instance = instance if instance is not None else self.instances[0]
        clock = _Timings(timings)
        outcomes: list[Any] = [None] * len(requests)
        batch: list[Any] = []
        positions: list[int] = []
        with clock("preprocess"):
            for index, request in enumerate(requests):
                try:
                    value = await steps.preprocess(request, None)
                    steps.describe(value)
                except Exception as exc:
                    outcomes[index] = exc
                else:
                    batch.append(value)
                    positions.append(index)
        if sizes is not None:
            sizes.append(len(batch))
        with clock("infer"):
            try:
                results = await instance.compute(batch) if batch else []
            except Exception as exc:
                results = instance.failure(exc, len(batch))
        with clock("postprocess"):
            for index, result in zip(positions, results, strict=True):
                if isinstance(result, BaseException):
                    outcomes[index] = result
                    continue
                try:
                    outcomes[index] = await steps.postprocess(result, None)
                except Exception as exc:
                    outcomes[index] = exc
        return outcomes

    # -- health -----------------------------------------------------------------

    async def check(
        self, timeout: float, devices: DeviceManager
    ) -> tuple[list[str], tuple[DeviceInfo, ...]]:
        """Every instance's ``health`` check and its device's: problems, and the devices now.

        The checks run at once, each within ``timeout`` seconds.
        """
        problems: list[str] = []

        async def check(instance: Instance) -> None:
            try:
                with anyio.fail_after(timeout):
                    healthy = await instance.health()
            except TimeoutError:
                problems.append(
                    f"instance {instance.index}: health check took longer than {timeout:g} s"
                )
            except Exception as exc:
                problems.append(f"instance {instance.index}: health check raised {describe(exc)}")
            else:
                if not healthy:
                    problems.append(f"instance {instance.index}: health check returned False")

        async with anyio.create_task_group() as tasks:
            for instance in self.instances:
                tasks.start_soon(check, instance)
        infos = await anyio.to_thread.run_sync(self._device_infos, devices)
        for instance in self.instances:
            info = infos.get(instance.device)
            if info is not None and not info.healthy:
                problems.append(
                    f"instance {instance.index}: device {info.device} failed: {info.error}"
                )
        return sorted(problems), tuple(infos.values())

    def _device_infos(self, manager: DeviceManager) -> dict[Device, DeviceInfo]:
        """Each device the instances use, as the device manager sees it now."""
        found: dict[Device, DeviceInfo] = {}
        for instance in self.instances:
            device = instance.device
            if device in found:
                continue
            try:
                found[device] = manager.info(device)
            except DeviceError as exc:
                found[device] = DeviceInfo(
                    device=device, name="unknown", healthy=False, error=exc.message
                )
        return found


def source_name(source: Source, config: ModelConfig) -> str:
    """The name a model serving ``source`` gets by default; checks the source.

    Raises:
        ConfigError: not a handler or a factory, or one handler object for
            several instances.
    """
    if isinstance(source, ModelHandler):
        if config.instances > 1:
            raise ConfigError(
                f"{config.instances} instances need one handler each: pass the handler "
                f"class (or a factory) instead of a {type(source).__name__} object"
            )
        return type(source).__name__
    if not callable(source):
        raise ConfigError(
            f"handler must be a ModelHandler or a factory that makes one, "
            f"not {type(source).__name__}"
        )
    name = getattr(source, "__name__", type(source).__name__)
    return name if is_name(name) else "model"  # a lambda, say


async def start_instances(
    *,
    name: str,
    version: str,
    config: ModelConfig,
    source: Source,
    devices: DeviceManager,
    report: Callable[[ModelState, str | None], None],
) -> Instances:
    """Place, create, init and warm up every instance of a model.

    ``report`` is told of ``WARMING`` once every instance is initialised,
    and of ``FAILED`` with the reason if the start fails: then whatever
    started is torn down, and :class:`LifecycleError` is raised with the
    cause chained (cancellation is re-raised as it is).
    """
    started: list[Instance] = []
    instances: list[Instance] = []
    stage = "placing instances"
    shared = threads(config.worker_threads, f"mds-{name}", abandon=True)
    try:
        # Device discovery may import torch or talk to a driver: off the loop.
        placer = await anyio.to_thread.run_sync(
            functools.partial(devices.placer, config, where=f"model {name!r}")
        )
        began = anyio.current_time()

        def make(index: int, device: Device) -> Instance:
            return _make_instance(name, version, config, source, index, device, placer, shared)

        if placer.sequential:
            # Memory placement by measurement: each instance is placed after
            # the previous one has loaded, against fresh free memory.
            stage = "init"
            for index in range(config.instances):
                device = await anyio.to_thread.run_sync(placer.next)
                instances.append(make(index, device))
                await _on_each(instances[-1:], _init_one, started)
                await anyio.to_thread.run_sync(placer.initialised, device)
        else:
            placed = await anyio.to_thread.run_sync(placer.place_all)
            instances.extend(make(index, device) for index, device in enumerate(placed))
            stage = "init"
            await _on_each(instances, _init_one, started)
        loaded = Instances(instances, Steps(instances[0].handler, name, shared), shared)
        loaded.init_seconds = anyio.current_time() - began
        report(ModelState.WARMING, None)
        stage = "warm-up"
        began = anyio.current_time()
        await loaded.warm_up(warmup_sizes(config))
        loaded.warmup_seconds = anyio.current_time() - began
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await _teardown(started)
        _release(instances, shared)
        cause = _root_cause(exc)
        if isinstance(cause, anyio.get_cancelled_exc_class()):
            report(ModelState.FAILED, f"start cancelled during {stage}")
            raise
        if isinstance(cause, _StageError):
            reason = str(cause)
            cause = cause.__cause__ or cause
        elif isinstance(cause, DeviceError):
            reason = cause.message
        else:
            reason = f"{stage} raised {describe(cause)}"
        report(ModelState.FAILED, reason)
        raise LifecycleError(f"failed to start: {reason}", model=name, version=version) from cause
    return loaded


def _make_instance(
    name: str,
    version: str,
    config: ModelConfig,
    source: Source,
    index: int,
    device: Device,
    placer: Placer,
    shared: Threads,
) -> Instance:
    handler = source if isinstance(source, ModelHandler) else source()
    if not isinstance(handler, ModelHandler):
        raise ConfigError(
            f"the handler factory returned {type(handler).__name__}, not a ModelHandler"
        )
    context = ModelContext(
        name=name,
        version=version,
        device=device,
        instance=index,
        config=config,
        threads=placer.cpu_threads() if device.kind == "cpu" else None,
    )
    return Instance(handler, context, shared, placer.manager)


def _release(instances: Sequence[Instance], shared: Threads) -> None:
    """Let the threads of ``instances`` and the model's shared ones go."""
    for instance in instances:
        instance.threads.close()
    shared.close()


async def _on_each(
    instances: Sequence[Instance],
    step: Callable[[Instance], Any],
    done: list[Instance] | None = None,
) -> None:
    """Run ``step`` on every instance at once; raise the first failure."""
    failures: list[BaseException] = []

    async def one(instance: Instance) -> None:
        try:
            await step(instance)
        except anyio.get_cancelled_exc_class():
            # The step's thread was waited for, or never ran it: torn down
            # either way, as a teardown after a withdrawn init is harmless.
            if done is not None:
                done.append(instance)
            raise
        except Exception as exc:
            failures.append(exc)
        else:
            if done is not None:
                done.append(instance)

    async with anyio.create_task_group() as tasks:
        for instance in instances:
            tasks.start_soon(one, instance)
    if failures:
        raise failures[0]


async def _init_one(instance: Instance) -> None:
    try:
        await instance.init()
    except Exception as exc:
        raise _StageError(
            f"init of instance {instance.index} on {instance.device} raised {describe(exc)}"
        ) from exc


async def _teardown(instances: Sequence[Instance]) -> None:
    async def one(instance: Instance) -> None:
        try:
            await instance.teardown()
        except Exception:
            context = instance.context
            logger.exception(
                "%s: teardown failed",
                instance.where,
                extra=_logs.fields(context.name, context.version),
            )

    async with anyio.create_task_group() as tasks:
        for instance in instances:
            tasks.start_soon(one, instance)


class _Timings:
    """Adds the seconds spent in each ``with timings(step):`` to a dict."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        if self.timings is None:
            yield
            return
        began = anyio.current_time()
        try:
            yield
        finally:
            self.timings[step] = self.timings.get(step, 0.0) + anyio.current_time() - began


class _StageError(Exception):
    """A start's failure, with the message that says at which stage."""


def _root_cause(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
