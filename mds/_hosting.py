"""Keeping a runtime's models running: one task each, in the runtime's task group."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import anyio
import anyio.abc

from ._errors import MdsError
from ._model import ModelRuntime

__all__ = ["Hosting"]

logger = logging.getLogger(__name__)


class _Hosted:
    """The task that keeps one model running."""

    def __init__(self) -> None:
        self.stop = anyio.Event()
        self.done = anyio.Event()


class Hosting:
    """The models of a runtime, each held running (``async with model``) by a task.

    Args:
        models: the runtime's models, by name (read as they are when started).
        owner: the runtime, for logs.
    """

    def __init__(self, models: Mapping[str, ModelRuntime[Any, Any]], owner: object) -> None:
        self._models = models
        self._owner = owner
        self._hosted: dict[str, _Hosted] = {}
        self._tasks: anyio.abc.TaskGroup | None = None
        self._loading: anyio.CancelScope | None = None

    @property
    def open(self) -> bool:
        """Whether models can be started (between :meth:`enter` and :meth:`close`)."""
        return self._tasks is not None

    def hosts(self, name: str) -> bool:
        """Whether the model called ``name`` is started (or starting)."""
        return name in self._hosted

    async def enter(self) -> None:
        tasks = anyio.create_task_group()
        await tasks.__aenter__()
        self._tasks = tasks

    async def start_all(self) -> dict[str, MdsError]:
        """Start every model at once; once they are ready or failed, the failures by name."""
        failures: dict[str, MdsError] = {}

        async def start(name: str) -> None:
            try:
                await self.start(name)
            except MdsError as exc:
                failures[name] = exc

        async with anyio.create_task_group() as tasks:
            for name in list(self._models):
                tasks.start_soon(start, name)
        return failures

    def start_all_in_background(self) -> None:
        """Start every model; return at once. :meth:`close` stops those still loading."""
        assert self._tasks is not None
        self._loading = scope = anyio.CancelScope()
        self._tasks.start_soon(self._load_in_background, scope)

    async def _load_in_background(self, scope: anyio.CancelScope) -> None:
        with scope:
            failures = await self.start_all()
            for name in failures:  # each model logged why; it stays FAILED
                logger.error("%r: model %r failed to load in the background", self._owner, name)
        self._loading = None

    async def start(self, name: str) -> None:
        """Start one model; returns once it is ready. Raises what its start raised."""
        assert self._tasks is not None
        hosted = _Hosted()
        self._hosted[name] = hosted
        try:
            await self._tasks.start(_host, self._models[name], hosted)
        except BaseException:
            if self._hosted.get(name) is hosted:  # not stopped meanwhile
                del self._hosted[name]
            raise

    async def stop(self, name: str) -> bool:
        """Stop one model (drain, then teardown); ``False`` if it was not running."""
        hosted = self._hosted.pop(name, None)
        if hosted is None:
            return False
        hosted.stop.set()
        await hosted.done.wait()
        return True

    async def close(self, *, cancel: bool) -> None:
        """Stop every model (draining unless ``cancel``), then the task group."""
        tasks = self._tasks
        if tasks is None:
            return
        if cancel:
            tasks.cancel_scope.cancel()
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
