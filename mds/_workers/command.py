"""``mds worker``: a queue worker from the command line, for a Kubernetes deployment.

The model comes as for ``mds batch`` (a handler with ``--config``, or a
pipeline file); the queue, the sink and the worker's settings from a YAML
file whose values may name environment variables, ``${NAME}``::

    source:
      sqs: https://sqs.eu-west-1.amazonaws.com/123456789012/claims
      dead_letters: https://sqs.eu-west-1.amazonaws.com/123456789012/claims-dead
    sink:
      sqs: https://sqs.eu-west-1.amazonaws.com/123456789012/verdicts
    max_in_flight: 64

SIGTERM (or Ctrl-C) stops receiving, lets the messages in flight finish,
releases the rest and exits 0; a second one stops at once.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import msgspec

from .._errors import ConfigError, MdsError, describe
from .core import QueueWorker, Sink, Source

__all__ = ["add_arguments", "run_command"]


class _Redis(msgspec.Struct, forbid_unknown_fields=True):
    stream: str
    url: str = "redis://localhost:6379/0"
    group: str = "mds"
    consumer: str | None = None


class _S3(msgspec.Struct, forbid_unknown_fields=True):
    bucket: str
    prefix: str = ""
    suffix: str = ".json"


class _SourceConfig(msgspec.Struct, forbid_unknown_fields=True):
    sqs: str | None = None
    redis: _Redis | None = None
    dead_letters: str | None = None


class _SinkConfig(msgspec.Struct, forbid_unknown_fields=True):
    sqs: str | None = None
    s3: _S3 | None = None
    redis: _Redis | None = None


class WorkerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The worker file: where messages come from and go, and the worker's settings."""

    source: _SourceConfig
    sink: _SinkConfig
    #: An S3/SQS-compatible endpoint (a local one, MinIO, LocalStack), if not AWS's.
    endpoint_url: str | None = None
    region: str | None = None
    max_in_flight: int = 64
    visibility: float = 30.0
    heartbeat: float = 10.0
    max_deliveries: int = 5
    backoff: tuple[float, float] = (1.0, 60.0)
    wait: float = 10.0
    drain_timeout: float = 30.0
    timeout: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        help="a handler (module:Class, or a module defining one) or a pipeline's YAML file",
    )
    parser.add_argument(
        "worker", help="the worker's YAML file: source, sink and settings (see the docs)"
    )
    parser.add_argument("--config", help="the model's config as a YAML file (ModelConfig fields)")
    parser.add_argument("--name", help="the model's name (default: the handler's)")
    parser.add_argument("--model-version", default="1", help="the model's version (default 1)")
    parser.add_argument(
        "--health-port",
        type=int,
        help="serve /health/live, /health/ready and /statistics on this port (for probes)",
    )


_VARIABLE = re.compile(r"\$\{(\w+)\}")


def _substituted(value: Any, path: str) -> Any:
    """``value`` with ``${NAME}`` in its strings read from the environment.

    After the YAML is parsed, not before: a variable is a value (newlines
    and all), never more YAML, and a comment that names one needs none.
    """
    if isinstance(value, dict):
        return {key: _substituted(item, path) for key, item in value.items()}
    if isinstance(value, list):
        return [_substituted(item, path) for item in value]
    if not isinstance(value, str):
        return value

    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"{path}: ${{{name}}} is not set in the environment")
        return os.environ[name]

    return _VARIABLE.sub(variable, value)


def read_config(path: str) -> WorkerConfig:
    """The worker file, with ``${NAME}`` in its values read from the environment.

    Raises:
        ConfigError: it cannot be read, a variable is not set, or a field is
            wrong (the message names it).
    """
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the worker file: {exc}") from None
    try:
        raw = msgspec.yaml.decode(text)
    except msgspec.DecodeError as exc:
        hint = ' (a ${NAME} inside {...} or [...] needs quotes: "${NAME}")' if b"${" in text else ""
        raise ConfigError(f"{path}: not valid YAML{hint}: {exc}") from None
    try:
        # Not strict: a number from a variable (``max_in_flight: ${MOST}``) is text.
        config = msgspec.convert(_substituted(raw, path), WorkerConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if (config.source.sqs is None) == (config.source.redis is None):
        raise ConfigError(f"{path}: the source is either sqs or redis, one of them")
    if sum(x is not None for x in (config.sink.sqs, config.sink.s3, config.sink.redis)) != 1:
        raise ConfigError(f"{path}: the sink is one of sqs, s3 and redis")
    return config


def make_source_and_sink(config: WorkerConfig) -> tuple[Source, Sink]:
    """The source and sink a worker file describes."""
    from .sqs import S3Sink, SqsSink, SqsSource

    def aws(service: str) -> Any:
        from .._deps import require

        boto3 = require("boto3", feature="mds worker with SQS or S3")
        return boto3.client(service, endpoint_url=config.endpoint_url, region_name=config.region)

    def redis_client(url: str) -> Any:
        from .._deps import require

        return require("redis", feature="mds worker with Redis Streams").Redis.from_url(url)

    source: Source
    if config.source.sqs is not None:
        source = SqsSource(
            config.source.sqs, dead_letters=config.source.dead_letters, client=aws("sqs")
        )
    else:
        from .redis import RedisStreamSource

        found = config.source.redis
        assert found is not None
        source = RedisStreamSource(
            found.stream,
            group=found.group,
            consumer=found.consumer,
            dead_letters=config.source.dead_letters,
            client=redis_client(found.url),
        )
    sink: Sink
    if config.sink.sqs is not None:
        sink = SqsSink(config.sink.sqs, client=aws("sqs"))
    elif config.sink.s3 is not None:
        s3 = config.sink.s3
        sink = S3Sink(s3.bucket, prefix=s3.prefix, suffix=s3.suffix, client=aws("s3"))
    else:
        from .redis import RedisStreamSink

        found = config.sink.redis
        assert found is not None
        sink = RedisStreamSink(found.stream, client=redis_client(found.url))
    return source, sink


def run_command(args: argparse.Namespace) -> int:
    """Run the worker until SIGTERM; 0 once drained, 1 when it cannot start."""
    from .._batch.command import build_runtime

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # handler modules beside the caller, as python -m finds
    try:
        config = read_config(args.worker)
        runtime, name = build_runtime(args)
        try:
            source, sink = make_source_and_sink(config)
        except MdsError:
            raise
        except Exception as exc:  # botocore's NoRegionError, a Redis URL that is not one
            message = f"{args.worker}: cannot set up the source or sink: {describe(exc)}"
            raise ConfigError(message) from None
        worker = QueueWorker(
            runtime,
            name,
            source,
            sink,
            max_in_flight=config.max_in_flight,
            visibility=config.visibility,
            heartbeat=config.heartbeat,
            max_deliveries=config.max_deliveries,
            backoff=config.backoff,
            wait=config.wait,
            drain_timeout=config.drain_timeout,
            timeout=config.timeout,
        )
    except MdsError as exc:
        print(f"mds worker: {exc}", file=sys.stderr)
        return 1
    health = None
    if args.health_port is not None:
        from .health import HealthServer

        health = HealthServer(worker, port=args.health_port)
        health.start()
    try:
        return anyio.run(_main, worker)
    except KeyboardInterrupt:  # a second signal: stopped at once
        print("mds worker: stopped at once; messages held come back after their visibility")
        return 130
    finally:
        if health is not None:
            health.stop()


async def _main(worker: QueueWorker) -> int:
    failed: list[Exception] = []
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_on_signals, worker)
            await worker.run()
            tasks.cancel_scope.cancel()
    except* MdsError as group:  # it could not start: a target or queue that is not there
        failed += group.exceptions
    if failed:
        print(f"mds worker: {failed[0]}", file=sys.stderr)
        return 1
    stats = worker.statistics()
    print(
        f"mds worker: stopped; {stats.completed} completed, {stats.dead_lettered} dead-lettered, "
        f"{stats.released} released"
    )
    return 0


async def _on_signals(worker: QueueWorker) -> None:
    """The first SIGINT or SIGTERM drains the worker; a second stops it at once."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        stopping = False
        async for _ in signals:
            if stopping:
                raise KeyboardInterrupt
            stopping = True
            worker.stop()
