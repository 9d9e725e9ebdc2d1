"""The standalone server, ``mds serve REPOSITORY``, and mds's routes as one lean ASGI app.

Point the command at a model repository and every model in it is served
over mds's JSON routes and the Open Inference Protocol (HTTP, and gRPC with
``--grpc-port``), with health, Prometheus metrics, graceful drain on
SIGTERM, and several worker processes if asked::

    mds serve models/ --port 8000 --workers 2

The request path is mds's own ASGI application (:func:`app`): raw ASGI, the
body decoded with msgspec, no framework layer per request, on uvicorn with
uvloop and httptools where they are installed. In your own FastAPI app,
:func:`mds.fastapi.add_routes` serves the same routes past the app's router.

Settings come from, lowest first: the defaults, a YAML file
(``--config``), ``MDS_SERVE_*`` environment variables, the command's flags.
See :class:`ServerConfig` and :doc:`/server`.

Added in 0.5.
"""

# No `from __future__ import annotations`: msgspec reads ServerConfig's annotations.

import contextlib
import gc
import os
import sys
import tempfile
from collections.abc import Callable, Coroutine, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import msgspec
from msgspec import Meta

from ._deps import require
from ._errors import ConfigError
from ._http.app import App
from ._http.service import make_service
from ._pipeline.graph import Pipeline
from ._repository.repository import ModelRepository
from ._runtime import Load, Runtime

__all__ = ["ServerConfig", "app", "load_config", "run"]

#: The repository's folder of pipeline files.
PIPELINES = "pipelines"

#: What the parent process hands its worker processes: the settings, and where
#: their metrics meet (not MDS_SERVE_*: those are the user's settings).
_WORKER_SETTINGS = "MDS_WORKER_SETTINGS"
_WORKER_METRICS = "MDS_WORKER_METRICS_DIRECTORY"


def app(
    runtime: Runtime,
    *,
    prefix: str = "",
    v2: bool = True,
    timeout_header: str = "Mds-Timeout",
    priority_header: str = "Mds-Priority",
    max_body_bytes: int = 64 * 1024 * 1024,
    retry_after: int = 1,
    load: Load = "background",
    repository: ModelRepository | None = None,
    metrics: Any = False,
    status_page: bool = False,
) -> Any:
    """An ASGI application serving ``runtime``'s models over mds's routes.

    The same routes, bodies, statuses and headers as :func:`mds.fastapi.add_routes`
    (see :doc:`/fastapi`), with no framework in between: serve it with any
    ASGI server, or mount it in a FastAPI or Starlette app
    (``app.mount("/ml", mds.server.app(runtime))``: a mounted app gets no
    lifespan of its own, so run the runtime in the host app's lifespan).
    Its own ASGI lifespan, when the server sends one, runs ``runtime``.

    Args:
        runtime: the runtime whose models and pipelines are served.
        prefix: a path prefix for every route.
        v2: add the Open Inference Protocol's routes under ``{prefix}/v2``.
        timeout_header: the header that sets a request's deadline in seconds.
        priority_header: the header that sets a request's priority level.
        max_body_bytes: a larger request body gets a 400 before it is read.
        retry_after: the ``Retry-After`` seconds sent with a 429 or 503.
        load: ``"background"`` (serve at once; readiness says when the
            models are loaded) or ``"wait"`` (see :meth:`mds.Runtime.run`).
        repository: add the protocol's repository routes (index, load,
            unload) for it. They have no auth of their own: keep such a
            server behind yours.
        metrics: ``GET {prefix}/metrics``: ``True`` for ``runtime``'s
            metrics, or a ``prometheus_client`` registry served as it is.
        status_page: add ``GET {prefix}/status``.

    Example:
        >>> uvicorn.run(mds.server.app(runtime), port=8000)
    """
    service = make_service(
        runtime,
        repository=repository is not None,
        metrics=metrics,
        timeout_header=timeout_header,
        priority_header=priority_header,
        max_body_bytes=max_body_bytes,
        retry_after=retry_after,
    )
    return App(
        service,
        prefix=prefix,
        v2=v2,
        status_page=status_page,
        repository=repository,
        load=load,
    )


class ServerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What ``mds serve`` serves, and how.

    Each field is also a flag (``--grpc-port``) and an environment variable
    (``MDS_SERVE_GRPC_PORT``); a YAML file (``--config``) may set any of
    them by name. Flags win over variables, variables over the file.

    Attributes:
        repository: the model repository's folder.
        host: the address to listen on.
        port: the HTTP port.
        workers: worker processes, each with its own runtime (and its own
            copy of the models), sharing the port; their metrics add up.
        grpc_port: also serve Triton's gRPC service on this port (needs the
            ``grpc`` extra); ``None`` for none.
        prefix: a path prefix for every route.
        load: ``"background"``: take connections at once, readiness 503
            until every model is ready; ``"wait"``: listen once they are.
        watch: read the repository every ``watch`` seconds and apply what
            changed (new versions swapped in warm); ``None`` to read it once.
        repository_routes: add the protocol's repository routes (index,
            load, unload). They have no auth: only behind yours.
        metrics: serve ``GET /metrics`` (Prometheus; needs the ``metrics`` extra).
        status_page: serve ``GET /status``.
        drain_timeout: on SIGTERM, how long requests in flight may take to
            finish, in seconds, before the server stops anyway.
        max_body_bytes: a larger request body gets a 400 before it is read.
        log_level: ``debug``, ``info``, ``warning`` or ``error``.
        access_log: log every request.
        http_server: the HTTP server underneath: ``granian`` (a Rust HTTP
            server for ASGI) or ``uvicorn`` (with uvloop and httptools);
            ``auto``, uvicorn if it is installed (the ``server`` extra
            installs both). Measured in benchmarks/transports.py: the same
            requests/s at 64 and 256 clients on one core, a p50 lower by a
            sixth at one client on uvicorn, a p99 lower by a tenth at 256
            clients on granian.

    Added in 0.5.
    """

    repository: str
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    workers: Annotated[int, Meta(ge=1)] = 1
    grpc_port: Annotated[int, Meta(ge=0, le=65535)] | None = None
    prefix: str = ""
    load: Literal["background", "wait"] = "background"
    watch: Annotated[float, Meta(gt=0)] | None = None
    repository_routes: bool = False
    metrics: bool = True
    status_page: bool = False
    drain_timeout: Annotated[float, Meta(ge=0, le=86400)] = 30.0
    max_body_bytes: Annotated[int, Meta(ge=1)] = 64 * 1024 * 1024
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = False
    http_server: Literal["auto", "granian", "uvicorn"] = "auto"


_DEFAULTS = ServerConfig(repository=".")


def load_config(
    flags: Mapping[str, Any],
    *,
    file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerConfig:
    """The server's settings: the defaults, then ``file``, then ``MDS_SERVE_*``, then ``flags``.

    ``flags`` holds what was given on the command line (``None`` for a flag
    not given).

    Raises:
        ConfigError: a setting of the wrong type or out of range, naming
            where it came from; an unknown setting in the file.
    """
    settings: dict[str, Any] = {}
    origin: dict[str, str] = {}  # where each setting came from, for the error
    if file is not None:
        path = Path(file)
        try:
            found = msgspec.yaml.decode(path.read_bytes()) or {}
        except (OSError, msgspec.DecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the server's settings: {exc}") from None
        if not isinstance(found, dict):
            raise ConfigError(f"{path}: the server's settings must be a mapping of names to values")
        try:  # checked here too, to name the file
            msgspec.convert({"repository": ".", **found}, ServerConfig, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        settings.update(found)
        origin.update(dict.fromkeys(found, str(path)))
    names = ServerConfig.__struct_fields__
    flags_of = {n: isinstance(getattr(_DEFAULTS, n), bool) for n in names}
    for name, value in (environ if environ is not None else os.environ).items():
        if not name.startswith("MDS_SERVE_"):
            continue
        field = name.removeprefix("MDS_SERVE_").lower()
        if field not in names:
            raise ConfigError(
                f"environment variable {name}: no such setting; the settings are "
                + ", ".join(f"MDS_SERVE_{n.upper()}" for n in names)
            )
        settings[field] = _from_text(value, flag=flags_of[field])
        origin[field] = f"environment variable {name}"
    given = {k: v for k, v in flags.items() if v is not None}
    settings.update(given)
    origin.update({k: f"flag --{k.replace('_', '-')}" for k in given})
    if "repository" not in settings:
        raise ConfigError("no model repository: give its folder (mds serve REPOSITORY)")
    try:
        return msgspec.convert(settings, ServerConfig, strict=False)
    except msgspec.ValidationError as exc:
        field = str(exc).rpartition("$.")[2].strip("`")
        where = origin.get(field, "the server's settings")
        raise ConfigError(f"{where}: {exc}") from None


def _from_text(value: str, *, flag: bool) -> Any:
    """An environment variable's value: ``none`` for none; yes/no/on/off for a flag."""
    text = value.strip().lower()
    if text in ("none", "null"):
        return None
    if flag and text in _WORDS:
        return _WORDS[text]
    return value


_WORDS = {"yes": True, "on": True, "true": True, "1": True}
_WORDS |= {"no": False, "off": False, "false": False, "0": False}


def build(config: ServerConfig) -> tuple[Runtime, Any]:
    """The runtime serving ``config``'s repository, and the ASGI app serving it.

    Raises:
        ConfigError: a problem in the repository (each with its file and
            field), or in one of its pipelines.
    """
    runtime = Runtime()
    repository = ModelRepository(config.repository)
    repository.add_to(runtime, watch=config.watch)
    # Pipelines: each YAML file in the repository's pipelines/ folder (a folder
    # without mds.yaml, so no model), its model nodes naming the repository's models.
    for file in sorted((Path(config.repository) / PIPELINES).glob("*.y*ml")):
        runtime.add_pipeline(Pipeline.load(file))
    metrics: Any = False
    if config.metrics:
        core = require("prometheus_client", feature="mds serve's /metrics")
        from .prometheus import Collector

        directory = os.environ.get(_WORKER_METRICS)  # several workers: theirs add up
        metrics = core.CollectorRegistry(auto_describe=True)
        metrics.register(Collector(runtime, directory=directory))
    routed = repository if config.repository_routes else None
    companions: tuple[Any, ...] = ()
    background: list[Callable[[], Coroutine[Any, Any, None]]] = [
        partial(_freeze_when_ready, runtime)
    ]
    if config.grpc_port is not None:
        require("grpc", feature="mds serve --grpc-port")
        from .grpc import Server

        address = f"{config.host}:{config.grpc_port}"
        companions += (Server(runtime, address, repository=routed, grace=config.drain_timeout),)
    peers = None
    shared = os.environ.get(_WORKER_METRICS)
    if shared is not None:  # several workers: readiness adds up across them
        readiness = _SharedReadiness(runtime, Path(shared) / "ready", config.workers)
        background.append(readiness.share)
        peers = readiness.waiting
    service = make_service(
        runtime,
        repository=routed is not None,
        metrics=metrics,
        max_body_bytes=config.max_body_bytes,
        peers=peers,
    )
    served = App(
        service,
        prefix=config.prefix,
        status_page=config.status_page,
        repository=routed,
        load=config.load,
        companions=companions,
        background=tuple(background),
    )
    return runtime, served


async def _freeze_when_ready(runtime: Runtime) -> None:
    """Once every model is ready, keep the collector off what startup made (``gc.freeze``).

    Loading made hundreds of thousands of objects (modules, weights' wrappers)
    that live for good; each full collection scanned them all, stalling every
    request in flight for tens of milliseconds: the server's p99 at 64
    clients went from 92 ms to 15 ms once they were frozen
    (benchmarks/transports.py).
    """
    with anyio.move_on_after(600):  # a model that never gets ready: freeze all the same
        while not (await runtime.health()).ready:  # noqa: ASYNC110 - startup only
            await anyio.sleep(0.5)
    gc.collect()
    gc.freeze()


class _SharedReadiness:
    """This worker's readiness in a folder the server's workers share, and theirs read back.

    So that any worker's ``/health/ready`` answers for the whole server: a
    probe reaches one worker, and must not call the pod ready while another
    still loads. Each worker writes its state every half second; one not
    heard from for 5 seconds has exited and no longer counts.
    """

    def __init__(self, runtime: Runtime, folder: Path, workers: int) -> None:
        self.runtime = runtime
        self.folder = folder
        self.workers = workers
        self.mine = folder / f"{os.getpid()}.json"
        self._waiting: list[str] = ["the others, not heard from yet"]

    def waiting(self) -> list[str]:
        """The other workers not ready yet, by process id (as last read)."""
        return self._waiting

    async def share(self) -> None:
        """Write this worker's state and read the others', every half second, until cancelled."""
        try:
            while True:
                ready = all(model.ready for model in self.runtime.models.values())
                self._waiting = await anyio.to_thread.run_sync(self._exchange, ready)
                await anyio.sleep(0.5)
        finally:
            self.mine.unlink(missing_ok=True)

    def _exchange(self, ready: bool) -> list[str]:
        """Write this worker's state; read the others' (in a thread: files)."""
        import time

        self.folder.mkdir(parents=True, exist_ok=True)
        now = time.time()
        written = self.mine.with_suffix(".tmp")
        written.write_bytes(msgspec.json.encode({"ready": ready, "at": now}))
        written.replace(self.mine)  # whole, for the readers
        waiting, heard = [], 1
        for file in self.folder.glob("*.json"):
            if file == self.mine:
                continue
            try:
                state = msgspec.json.decode(file.read_bytes())
            except (OSError, msgspec.DecodeError):
                continue  # gone, or being replaced
            if now - state.get("at", 0) >= 5:
                continue  # exited
            heard += 1
            if not state.get("ready"):
                waiting.append(file.stem)
        if heard < self.workers:  # started, but not writing yet (still importing, say)
            waiting.append(f"{self.workers - heard} not heard from yet")
        return sorted(waiting)


def worker_app() -> Any:
    """The ASGI app of one worker process (``uvicorn --factory``): settings from the parent."""
    settings = os.environ[_WORKER_SETTINGS]
    return build(msgspec.json.decode(settings, type=ServerConfig))[1]


def run(config: ServerConfig) -> None:
    """Serve ``config`` until SIGTERM or SIGINT, which drain the requests in flight.

    Raises:
        ConfigError: the repository has problems (each named), or a setting is wrong.
        MissingDependency: the ``server`` extra is not installed.
    """
    if config.repository_routes and config.workers > 1:
        raise ConfigError(
            "repository_routes with several workers: each worker would load and unload "
            "models on its own; serve the repository routes with one worker"
        )
    http_server = config.http_server
    if http_server == "auto":
        http_server = "uvicorn" if _installed("uvicorn") else "granian"
    if http_server == "granian":
        _run_granian(config)
        return
    uvicorn = require("uvicorn", feature="mds serve")
    options: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "log_level": config.log_level,
        "access_log": config.access_log,
        "timeout_graceful_shutdown": config.drain_timeout,
        "lifespan": "on",
        "loop": "uvloop" if _has("uvloop") else "asyncio",
        "http": "httptools" if _has("httptools") else "h11",
        "server_header": False,
    }
    if config.workers == 1:
        served = build(config)[1]
        _Drained(uvicorn.Config(served, **options)).run()
        return
    build(config)  # what it refuses is refused here, before any worker starts
    with _handed_to_workers(config):
        _run_uvicorn_workers(
            uvicorn.Config("mds.server:worker_app", factory=True, workers=config.workers, **options)
        )


def _run_uvicorn_workers(config: Any) -> None:
    """The supervisor of uvicorn's worker processes, exiting non-zero when a worker failed to start.

    uvicorn's own ``run`` stops every worker when one fails to start (a
    model that failed under ``--load wait``) but then exits with 0.
    """
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    supervisor = Multiprocess(config, sockets=[config.bind_socket()])
    supervisor.run()
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        sys.exit(STARTUP_FAILURE)


def _run_granian(config: ServerConfig) -> None:
    """Serve ``config`` on granian (a Rust HTTP server for ASGI), its workers in processes."""
    import math

    granian = require("granian", feature="mds serve --http-server granian")
    build(config)  # what it refuses is refused here, before any worker starts
    with _handed_to_workers(config):
        granian.Granian(
            "mds.server:worker_app",
            factory=True,
            address=config.host,
            port=config.port,
            interface="asgi",
            workers=config.workers,
            loop="uvloop" if _has("uvloop") else "asyncio",
            websockets=False,
            log_level=config.log_level,
            log_access=config.access_log,
            # On SIGTERM, how long a worker may take before it is killed: the
            # requests' drain, then the models' own stop (their drain_timeout).
            workers_kill_timeout=math.ceil(config.drain_timeout) + 60,
        ).serve()


@contextlib.contextmanager
def _handed_to_workers(config: ServerConfig) -> Iterator[None]:
    """The settings (and a folder for their metrics) in the environment the workers inherit."""
    with tempfile.TemporaryDirectory(prefix="mds-serve-metrics-") as directory:
        os.environ[_WORKER_SETTINGS] = msgspec.json.encode(config).decode()
        if config.workers > 1:
            os.environ[_WORKER_METRICS] = directory
        try:
            yield
        finally:
            os.environ.pop(_WORKER_SETTINGS, None)
            os.environ.pop(_WORKER_METRICS, None)


def _drained_server() -> Any:
    import contextlib

    import uvicorn

    class Drained(uvicorn.Server):
        """uvicorn's server, exiting with 0 once a SIGTERM has drained it (not by the signal)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()

    return Drained


def _Drained(config: Any) -> Any:
    return _drained_server()(config)


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _has(module: str) -> bool:
    """Installed, and to be used: mds leaves uvloop and httptools alone on Windows."""
    return _installed(module) and sys.platform != "win32"
