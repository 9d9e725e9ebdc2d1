"""A runtime as a Ray Serve deployment: each replica runs its own runtime, through mds's batcher.

Ray Serve brings the replicas, the routing between them, autoscaling and
the HTTP proxy; mds brings what runs inside one: the runtime (init,
warm-up, readiness), the batcher (which isolates a failing item, where
``@serve.batch`` fails its whole batch), and the routes. The replica's
ingress is mds's FastAPI app, so the clients that work against one process
(mds's JSON routes, the Open Inference Protocol, ``tritonclient``) work
against the cluster; a ``DeploymentHandle`` calls :meth:`Replica.serve`.

Ray Serve lets a replica take ``max_ongoing_requests`` at once (5 by
default): that caps every batch the replica can form. :func:`application`
sets it from the models' batching, and refuses one that would cap it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import msgspec

from .._config import BatchingConfig, queue_limits
from .._deps import require
from .._errors import ConfigError, MdsError, describe
from .._runtime import Runtime

__all__ = ["Replica", "application", "call", "ongoing_requests"]

#: Ray's actors take at most this many calls at once (an async actor's default).
_MOST_ONGOING = 1000
#: A replica with no model of its own: nothing to batch, only functions awaiting others.
_FUNCTIONS_ONGOING = 100


def _models(runtime: Runtime) -> dict[str, Any]:
    """Every model version a replica would run, by name and version."""
    return {
        f"{name}:{version}": model
        for name in runtime.models
        for version, model in runtime.versions(name).runtimes.items()
    }


def ongoing_requests(runtime: Runtime, given: int | None) -> int:
    """A replica's ``max_ongoing_requests``: ``given``, checked, or one that fits the models.

    Each model needs ``max_batch_size * instances`` requests at once to fill
    a batch on every instance; one more round can wait in its queue while
    those compute (up to its queue's limit). A replica serves all its
    models, so their needs add up.

    Raises:
        ConfigError: ``given`` is below what one model needs to form full
            batches; or the models need more than Ray takes at once.
    """
    needs: dict[str, int] = {}
    wanted = 0
    for where, model in _models(runtime).items():
        batching: BatchingConfig = model.config.batching
        full = batching.max_batch_size * model.config.instances
        needs[where] = full
        wanted += full + min(full, sum(queue_limits(batching)))
    if not needs:  # pipelines of functions alone (calling other deployments, say)
        return given if given is not None else _FUNCTIONS_ONGOING
    most = max(needs.values())
    if given is not None:
        if given < most:
            where = max(needs, key=lambda name: needs[name])
            raise ConfigError(
                f"max_ongoing_requests={given} caps every batch: model {where} needs "
                f"{most} requests at once (max_batch_size * instances) to fill its batches; "
                f"give {most} or more, or leave it out (mds sets it)"
            )
        return given
    if most > _MOST_ONGOING:
        raise ConfigError(
            f"the models need {most} requests at once to fill their batches, more than a Ray "
            f"actor takes ({_MOST_ONGOING}): give them fewer instances or smaller batches"
        )
    return min(_MOST_ONGOING, max(wanted, most))


class Replica:
    """One replica: a runtime of its own, started with the replica, mds's routes as its ingress.

    Made by Ray Serve in each replica process from ``build``, the function
    that makes the runtime (with its models and pipelines added). Its
    methods are what a ``DeploymentHandle`` calls: :meth:`serve`,
    :meth:`statistics`; and what Ray Serve calls: ``check_health`` and
    ``reconfigure``.

    Added in 0.5.
    """

    def __init__(self, build: Callable[[], Runtime], max_ongoing_requests: int) -> None:
        runtime = build()
        if not isinstance(runtime, Runtime):
            raise ConfigError(f"build() returned a {type(runtime).__name__}, not an mds.Runtime")
        self.runtime = runtime
        self.max_ongoing_requests = max_ongoing_requests
        self._failure: Exception | None = None  # why the runtime did not start

    def __serve_build_asgi_app__(self) -> Any:
        """Mds's FastAPI app for this replica; its lifespan starts the runtime and waits for it.

        Ray Serve runs the lifespan when the replica starts: a model that
        fails to load fails the replica, which Ray reports and replaces.
        """
        fastapi = require("fastapi", feature="mds.ray's HTTP routes")
        from ..fastapi import add_routes

        app = fastapi.FastAPI(title="mds on Ray Serve")
        add_routes(app, self.runtime, load="wait")
        starting = app.router.lifespan_context

        @asynccontextmanager
        async def recorded(app: Any) -> AsyncIterator[Any]:
            try:
                async with starting(app) as state:
                    yield state
            except Exception as exc:
                self._failure = exc
                raise

        app.router.lifespan_context = recorded
        return app

    async def _run_asgi_lifespan_startup(self) -> None:
        # Ray Serve's step (this class comes before its ASGI wrapper): it says
        # only that the lifespan failed; the replica's error says why.
        try:
            await super()._run_asgi_lifespan_startup()  # type: ignore[misc]
        except RuntimeError:
            if self._failure is not None:
                raise self._failure from None
            raise

    async def serve(
        self,
        model: str,
        request: Any,
        *,
        timeout: float | None = None,
        priority: int | None = None,
    ) -> Any:
        """Serve one request through the replica's model or pipeline (``handle.serve.remote``)."""
        return await self.runtime.serve(model, request, timeout=timeout, priority=priority)

    def statistics(self) -> dict[str, Any]:
        """This replica's models' statistics, as plain data (``handle.statistics.remote``)."""
        return msgspec.to_builtins(self.runtime.statistics())  # type: ignore[no-any-return]

    async def check_health(self) -> None:
        """Ray Serve's health check: raise when a model is not ready (Ray replaces the replica)."""
        health = await self.runtime.health()
        if not health.ready:
            reasons = [
                f"{name}: {report.reason or report.state.value}"
                for name, report in health.models.items()
                if not report.ready
            ]
            raise RuntimeError("models not ready: " + "; ".join(reasons or ["the runtime"]))

    async def reconfigure(self, config: Mapping[str, Any]) -> None:
        """Apply a deployment's ``user_config``: each model's batching, and its traffic.

        ``{"batching": {"model": {"max_batch_size": 16, ...}}, "traffic":
        {"model": {"1": 0.9, "2": 0.1}}}``. Batching fields not named keep
        their value; batching applies to the model's default version.

        Raises:
            ConfigError: a key or field that is not one, a model there is
                not, or a batch that ``max_ongoing_requests`` would cap.
        """
        unknown = set(config) - {"batching", "traffic"}
        if unknown:
            raise ConfigError(
                f"user_config has {sorted(unknown)!r}: it takes 'batching' and 'traffic'"
            )
        # Every model's new batching checked before any is changed: all or nothing.
        changes = []
        for name, fields in dict(config.get("batching", {})).items():
            model = self.runtime.model(name)
            try:
                batching = msgspec.convert(
                    {**msgspec.to_builtins(model.config.batching), **fields}, BatchingConfig
                )
            except msgspec.ValidationError as exc:
                raise ConfigError(f"user_config batching of {name!r}: {exc}") from None
            full = batching.max_batch_size * model.config.instances
            if full > self.max_ongoing_requests:
                raise ConfigError(
                    f"user_config batching of {name!r}: batches of {batching.max_batch_size} "
                    f"on {model.config.instances} instances need {full} requests at once, "
                    f"more than max_ongoing_requests ({self.max_ongoing_requests})"
                )
            changes.append((model, batching))
        for model, batching in changes:
            model.set_batching(batching)
        for name, weights in dict(config.get("traffic", {})).items():
            await self.runtime.set_traffic(name, {str(v): float(w) for v, w in weights.items()})


def application(
    build: Callable[[], Runtime],
    *,
    name: str = "mds",
    max_ongoing_requests: int | None = None,
    **options: Any,
) -> Any:
    """A Ray Serve application whose replicas each run the runtime ``build`` makes.

    ``build`` runs here once (its models' batching sets
    ``max_ongoing_requests``; nothing starts) and in each replica; it must
    be importable there (a module-level function). ``options`` are Ray
    Serve's deployment options, passed through: ``num_replicas``,
    ``autoscaling_config``, ``ray_actor_options`` (CPUs, GPUs),
    ``user_config``, ``health_check_period_s``, ... . An
    ``autoscaling_config`` without ``target_ongoing_requests`` gets one
    batch's worth (``max_batch_size * instances`` of its largest model):
    Ray's default, 2, would add replicas until no batch fills.

    Raises:
        ConfigError: ``max_ongoing_requests`` would cap the batches (or the
            models need more than Ray takes); ``build`` made no runtime.
        MissingDependency: Ray Serve is not installed
            (``pip install "mds-serving[ray]"``).

    Example:
        >>> handle = serve.run(mds.ray.application(build, num_replicas=2))
        >>> handle.serve.remote("risk", claim).result()

    Added in 0.5.
    """
    serve = require("ray.serve", feature="mds.ray")
    runtime = build()
    if not isinstance(runtime, Runtime):
        raise ConfigError(f"build() returned a {type(runtime).__name__}, not an mds.Runtime")
    ongoing = ongoing_requests(runtime, max_ongoing_requests)
    autoscaling = options.get("autoscaling_config")
    if isinstance(autoscaling, dict) and "target_ongoing_requests" not in autoscaling:
        # Ray's default target (2 a replica) would add replicas until no batch fills.
        fill = max(
            (
                m.config.batching.max_batch_size * m.config.instances
                for m in _models(runtime).values()
            ),
            default=1,
        )
        options["autoscaling_config"] = {**autoscaling, "target_ongoing_requests": fill}
    if "max_queued_requests" not in options:
        # Past what the replicas take at once, each caller (a proxy, a handle)
        # queues: bound it as mds bounds its queues.
        options["max_queued_requests"] = 4 * ongoing
    try:
        deployment = serve.deployment(serve.ingress()(Replica), name=name)
        bound = deployment.options(max_ongoing_requests=ongoing, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Ray Serve refused the deployment's options: {describe(exc)}") from None
    return bound.bind(build, ongoing)


async def call(
    handle: Any,
    model: str,
    request: Any,
    *,
    timeout: float | None = None,
    priority: int | None = None,
) -> Any:
    """Serve ``request`` on another mds deployment through its ``DeploymentHandle``.

    For a pipeline node whose model is a deployment of its own. An mds error
    there comes back as itself (``mds.InvalidInput``, with its message), not
    wrapped in Ray's error, whose message is the remote traceback: so a
    client's mistake is still a 400 at this deployment's routes.

    Example:
        >>> async def score(value):            # a pipeline's function node
        ...     handle = serve.get_deployment_handle("scores", app_name="scores")
        ...     return await mds.ray.call(handle, "scorer", value)

    Added in 0.5.
    """
    try:
        return await handle.serve.remote(model, request, timeout=timeout, priority=priority)
    except Exception as exc:
        cause = getattr(exc, "cause", None)  # Ray's RayTaskError: the replica's own error
        if isinstance(cause, MdsError):
            raise cause from None
        raise
