"""Serve a runtime's models over gRPC: the Open Inference Protocol as Triton serves it.

The service is Triton's ``inference.GRPCInferenceService`` (KServe V2 over
gRPC), so Triton's and KServe's gRPC clients (``tritonclient.grpc`` and its
``aio`` client, ``perf_analyzer``) call any model or pipeline, with the same
meaning as the HTTP adapters' ``/v2`` routes: rows, request parameters
(:func:`mds.request_context`), ``timeout`` and ``priority``, classification,
versions. Either run a server on a port of its own, which starts and stops
the runtime with it::

    async with mds.grpc.Server(runtime, "[::]:8001") as server:
        await anyio.sleep_forever()

or add the service to your own ``grpc.aio`` server, beside your services
and behind your interceptors::

    server = grpc.aio.server()
    mds.grpc.add_to_server(server, runtime)

RPCs:

=========================  ==================================================
``ServerLive``             whether the runtime runs
``ServerReady``            whether every model is ready
``ModelReady``             one model's (or version's) readiness
``ServerMetadata``         ``mds``, its version, the extensions it serves
``ModelMetadata``          a model's versions, platform, inputs, outputs
``ModelConfig``            Triton's model configuration, from mds's config
``ModelStatistics``        Triton's statistics, from mds's counters
``ModelInfer``             inference, tensors raw or in typed contents
``ModelStreamInfer``       a stream of requests; a streaming model's chunks
``Repository*``            index, load, unload (with ``repository``)
=========================  ==================================================

Shared memory, trace and log settings answer ``UNIMPLEMENTED``. mds's errors
become statuses with mds's message: ``NOT_FOUND`` (no such model or
version), ``INVALID_ARGUMENT`` (bad request), ``RESOURCE_EXHAUSTED``
(overloaded), ``UNAVAILABLE`` (not ready), ``DEADLINE_EXCEEDED``,
``INTERNAL``. The call's deadline bounds the request's as its ``timeout``
parameter does, and a client that cancels cancels its request in the
batcher. The ``traceparent`` and ``x-request-id`` metadata continue the
caller's trace and name the request in logs, as the HTTP headers do.

Needs ``pip install "mds-serving[grpc]"``.

Added in 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import anyio
from anyio.from_thread import BlockingPortal

from . import _loop
from ._bridge import LoopBound, forward, process_portal
from ._deps import require
from ._errors import LifecycleError
from ._repository.repository import ModelRepository
from ._runtime import Load, Runtime

if TYPE_CHECKING:
    import grpc

__all__ = ["Server", "add_to_server"]

T = TypeVar("T")


def add_to_server(
    server: grpc.aio.Server,
    runtime: Runtime,
    *,
    repository: ModelRepository | None = None,
    health: bool = True,
) -> None:
    """Serve ``runtime``'s models from your own ``grpc.aio`` server.

    It adds the service and nothing else: you start and stop the server,
    and run the runtime (``async with runtime``, or ``runtime.start_sync()``)
    in any event loop or thread. Your interceptors (auth, say) see its calls.

    Args:
        server: a ``grpc.aio.Server``, started or not.
        runtime: the runtime whose models and pipelines are served.
        repository: also serve the protocol's model repository RPCs (index,
            load, unload) for this repository, which must have been added to
            ``runtime``. They change what the server runs: guard them with
            an interceptor.
        health: also serve gRPC's standard health service
            (``grpc.health.v1.Health``, what Kubernetes' gRPC probes call):
            ``""`` is serving when every model is ready, a model's name when
            that model is. ``False`` if your server has its own.

    Raises:
        MissingDependency: grpcio or tritonclient is not installed
            (``pip install "mds-serving[grpc]"``).

    Example:
        >>> server = grpc.aio.server()
        >>> mds.grpc.add_to_server(server, runtime)
        >>> server.add_insecure_port("[::]:8001")
        >>> async with runtime:
        ...     await server.start()
        ...     await server.wait_for_termination()

    Added in 0.5.
    """
    grpc = require("grpc", feature="mds.grpc")
    if not isinstance(server, grpc.aio.Server):
        raise TypeError(
            f"mds.grpc.add_to_server takes a grpc.aio server, not {type(server).__name__}: "
            "its handlers are async. In sync code, run mds.grpc.Server(...).start_sync()"
        )
    _service().add(server, runtime, repository, health)


class Server(LoopBound):
    """A gRPC server on a port of its own, serving a runtime for as long as it runs.

    ``async with server:`` starts the runtime if it is not running yet,
    then the server; leaving stops the server (calls in flight get
    ``grace`` seconds to finish), then the runtime if it started it
    (draining). Sync code uses :meth:`start_sync` and :meth:`stop_sync`, or
    ``with server:``: both run in mds's background event loop.

    The server runs on an asyncio loop, as grpc.aio needs: the host's own,
    under asyncio. Under trio it runs on mds's background loop while the
    runtime lives in the trio loop, and each call is forwarded there. It
    never takes over the host's loop.

    Args:
        runtime: the runtime whose models and pipelines are served.
        address: where to listen, as ``host:port``; port 0 picks a free
            port (see :attr:`port`).
        repository: also serve the model repository RPCs for this
            repository (see :func:`add_to_server`); guard them with
            ``interceptors``.
        health: also serve gRPC's standard health service (see
            :func:`add_to_server`).
        max_message_bytes: the largest request message taken (gRPC's own
            default is 4 MiB); a larger one is refused with
            ``RESOURCE_EXHAUSTED``. As the HTTP adapters' ``max_body_bytes``.
        options: grpc channel options for the server, such as
            ``[("grpc.max_receive_message_length", 64 * 2**20)]``.
        grace: seconds that calls in flight get to finish when the server stops.
        load: how the runtime starts, if the server starts it: see
            :meth:`mds.Runtime.run`. ``"background"`` (the default): the
            server takes calls at once, and readiness says when the models are.
        credentials: ``grpc.ssl_server_credentials(...)`` to serve over TLS;
            ``None``: plaintext.
        interceptors: ``grpc.aio.ServerInterceptor`` objects every call goes
            through, such as your auth.

    Raises:
        MissingDependency: grpcio or tritonclient is not installed
            (``pip install "mds-serving[grpc]"``), when it starts.

    Example:
        >>> async with mds.grpc.Server(runtime, "127.0.0.1:0") as server:
        ...     client = tritonclient.grpc.InferenceServerClient(f"127.0.0.1:{server.port}")

    Added in 0.5.
    """

    def __init__(
        self,
        runtime: Runtime,
        address: str = "[::]:8001",
        *,
        repository: ModelRepository | None = None,
        options: Sequence[tuple[str, Any]] = (),
        grace: float = 5.0,
        load: Load = "background",
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        health: bool = True,
        max_message_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.runtime = runtime
        self.health = health
        self.max_message_bytes = max_message_bytes
        self.address = address
        self.repository = repository
        self.options = tuple(options)
        self.grace = grace
        self.load: Load = load
        self.credentials = credentials
        self.interceptors = tuple(interceptors)
        self._server: Any = None
        self._port: int | None = None
        # The loop the grpc server lives in when it is not the host's (under trio).
        self._portal: BlockingPortal | None = None
        self._started: Runtime | None = None  # the runtime, if this started it

    def __repr__(self) -> str:
        state = f"port {self._port}" if self._server is not None else "stopped"
        return f"<mds.grpc.Server {self.address} {state}>"

    @property
    def port(self) -> int:
        """The port it listens on (the one picked, for port 0).

        Raises:
            LifecycleError: it is not running.
        """
        if self._server is None or self._port is None:
            raise LifecycleError(f"{self!r} is not running; its port is bound when it starts")
        return self._port

    async def __aenter__(self) -> Self:
        if self._server is not None:
            raise LifecycleError(f"{self!r} is already running")
        service = _service()
        runtime = self.runtime
        started = runtime.run(load=self.load) if not runtime.running else None
        if started is not None:
            await started.__aenter__()
        try:
            if _loop.asyncio_loop() is not None:
                portal = None
                self._server = await self._start(service)
            else:  # grpc.aio runs on asyncio only
                portal = process_portal()
                self._server = await forward(portal, self._start, service)
        except BaseException as exc:
            if started is not None:
                await started.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._portal = portal
        self._started = runtime if started is not None else None
        return self

    async def _start(self, service: ModuleType) -> Any:
        """The grpc.aio server, serving; in the loop it will live in."""
        grpc = require("grpc", feature="mds.grpc")
        # gRPC takes the first value given for a key: the caller's own options win.
        options = [*self.options, ("grpc.max_receive_message_length", self.max_message_bytes)]
        server = grpc.aio.server(options=options, interceptors=self.interceptors or None)
        service.add(server, self.runtime, self.repository, self.health)
        try:
            if self.credentials is None:
                port = server.add_insecure_port(self.address)
            else:
                port = server.add_secure_port(self.address, self.credentials)
        except RuntimeError as exc:
            raise LifecycleError(f"mds.grpc.Server cannot listen on {self.address}: {exc}") from exc
        if not port:  # grpcio before 1.55 answers 0 rather than raising
            raise LifecycleError(f"mds.grpc.Server cannot listen on {self.address}")
        await server.start()
        self._port = port
        return server

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        server, portal, started = self._server, self._portal, self._started
        self._server = self._portal = self._started = None
        if server is None:
            return
        # Leaving on an error: calls in flight are cancelled at once, as the runtime's are.
        grace = self.grace if exc_type is None else 0.0
        try:
            with anyio.CancelScope(shield=True):
                if portal is None:
                    await server.stop(grace)
                else:
                    await forward(portal, server.stop, grace)
        finally:
            if started is not None:
                await started.__aexit__(exc_type, exc, tb)

    def start_sync(self) -> None:
        """Start in mds's background event loop, for code with no loop of its own.

        Blocks until the server listens (and, with ``load="wait"``, until
        the models are ready). Pair with :meth:`stop_sync`, or use ``with``;
        whatever is still running at interpreter exit is stopped then.

        Raises:
            LifecycleError: already started, or it cannot listen on its address.
        """
        super().start_sync()

    def stop_sync(self) -> None:
        """Stop what :meth:`start_sync` started: the server (``grace``), then the runtime."""
        super().stop_sync()


def _service() -> ModuleType:
    """The service's module, once its dependencies are known to be there."""
    require("grpc", feature="mds.grpc")
    require("tritonclient.grpc.service_pb2", feature="mds.grpc")
    require("grpc_health.v1.health_pb2", feature="mds.grpc")
    from ._grpc import service

    return service
