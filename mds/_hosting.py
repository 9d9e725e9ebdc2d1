"""Keeping a runtime's models running: one task each, in the runtime's task group."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import anyio
import anyio.abc

from ._errors import MdsError
from ._model import ModelRuntime

__all__ = ["Hosting"]

logger = logging.getLogger("mds.runtime")


class _Hosted:
    """The task that keeps one model running."""

    def __init__(self) -> None:
        self.stop = anyio.Event()
        self.done = anyio.Event()


class Hosting:
    """A runtime's model runtimes, each held running (``async with model``) by a task.

    Args:
        owner: the runtime, for logs.
    """

    def __init__(self, owner: object) -> None:
        self._owner = owner
        self._hosted: dict[ModelRuntime[Any, Any], _Hosted] = {}
        self._tasks: anyio.abc.TaskGroup | None = None
        self._loading: anyio.CancelScope | None = None
        self._companions: list[anyio.CancelScope] = []

    @property
    def open(self) -> bool:
        """Whether models can be started (between :meth:`enter` and :meth:`close`)."""
        return self._tasks is not None

    def hosts(self, model: ModelRuntime[Any, Any]) -> bool:
        """Whether ``model`` is started (or starting, or draining)."""
        return model in self._hosted

    async def enter(self) -> None:
        tasks = anyio.create_task_group()
        await tasks.__aenter__()
        self._tasks = tasks
        self._companions = []

    async def start_all(
        self, models: Iterable[ModelRuntime[Any, Any]]
    ) -> dict[ModelRuntime[Any, Any], MdsError]:
        """Start ``models`` at once; once they are ready or failed, the failures by model."""
        failures: dict[ModelRuntime[Any, Any], MdsError] = {}

        async def start(model: ModelRuntime[Any, Any]) -> None:
            try:
                await self.start(model)
            except MdsError as exc:
                failures[model] = exc

        async with anyio.create_task_group() as tasks:
            for model in models:
                tasks.start_soon(start, model)
        return failures

    def start_all_in_background(self, models: Iterable[ModelRuntime[Any, Any]]) -> None:
        """Start ``models``; return at once. :meth:`close` stops those still loading."""
        assert self._tasks is not None
        self._loading = scope = anyio.CancelScope()
        self._tasks.start_soon(self._load_in_background, list(models), scope)

    async def _load_in_background(
        self, models: list[ModelRuntime[Any, Any]], scope: anyio.CancelScope
    ) -> None:
        with scope:
            failures = await self.start_all(models)
            for model in failures:  # each model logged why; it stays FAILED
                logger.error("%r: %r failed to load in the background", self._owner, model)
        self._loading = None

    def start_soon(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn()`` beside the models until :meth:`close`, which cancels it first."""
        assert self._tasks is not None
        self._tasks.start_soon(self._beside, fn)

    async def _beside(self, fn: Callable[[], Awaitable[None]]) -> None:
        scope = anyio.CancelScope()
        self._companions.append(scope)
        try:
            with scope:
                await fn()
        finally:
            self._companions.remove(scope)

    async def start(self, model: ModelRuntime[Any, Any]) -> None:
        """Start one model; returns once it is ready. Raises what its start raised."""
        assert self._tasks is not None
        hosted = _Hosted()
        self._hosted[model] = hosted
        try:
            await self._tasks.start(_host, model, hosted)
        except BaseException:
            if self._hosted.get(model) is hosted:  # not stopped meanwhile
                del self._hosted[model]
            raise

    async def stop(self, model: ModelRuntime[Any, Any], *, wait: bool = True) -> bool:
        """Stop one model (drain, then teardown); ``False`` if it was not running.

        With ``wait=False`` it drains and tears down in the background.
        """
        hosted = self._hosted.pop(model, None)
        if hosted is None:
            return False
        hosted.stop.set()
        if wait:
            await hosted.done.wait()
        return True

    async def close(self, *, cancel: bool) -> None:
        """Stop every model (draining unless ``cancel``), then the task group."""
        tasks = self._tasks
        if tasks is None:
            return
        if cancel:
            tasks.cancel_scope.cancel()
        for scope in list(self._companions):
            scope.cancel()
        if self._loading is not None:
            self._loading.cancel()  # models still loading in the background stop loading
        for hosted in self._hosted.values():
            hosted.stop.set()
        try:
            await tasks.__aexit__(None, None, None)
        finally:
            self._tasks = None
            self._hosted.clear()


async def _host(
    model: ModelRuntime[Any, Any],
    hosted: _Hosted,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    try:
        async with model:
            task_status.started()
            await hosted.stop.wait()
    finally:
        hosted.done.set()
