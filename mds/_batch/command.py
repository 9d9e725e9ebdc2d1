"""``mds batch``: a batch job from the command line, on a handler or a pipeline file."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import anyio
import msgspec

from .._config import ModelConfig
from .._errors import ConfigError, MdsError
from .._instances import source_name
from .._pipeline.graph import Pipeline
from .._pipeline.loading import resolve_handler
from .._runtime import Runtime
from .job import Job, JobFailed
from .sources import FORMATS

__all__ = ["add_arguments", "build_runtime", "run_command"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        help="a handler (module:Class, or a module defining one) or a pipeline's YAML file",
    )
    parser.add_argument("input", help="a .jsonl, .csv or .parquet file, or a folder of Parquet")
    parser.add_argument("output", help="the output folder (its parts, ledger and error file)")
    parser.add_argument("--config", help="the model's config as a YAML file (ModelConfig fields)")
    parser.add_argument("--name", help="the model's name (default: the handler's)")
    parser.add_argument("--model-version", default="1", help="the model's version (default 1)")
    parser.add_argument("--format", choices=FORMATS, help="the input's format, if not its suffix")
    parser.add_argument("--output-format", choices=FORMATS, help="the output's format")
    parser.add_argument("--part-rows", type=int, default=10_000, help="rows per part (10000)")
    parser.add_argument("--resume", action="store_true", help="continue the job in OUTPUT")
    parser.add_argument("--overwrite", action="store_true", help="replace the job in OUTPUT")
    parser.add_argument(
        "--retry-failed", action="store_true", help="with --resume, serve failed rows again"
    )
    parser.add_argument(
        "--max-error-rate", type=float, help="stop once this share of rows failed (0 to 1)"
    )
    parser.add_argument("--in-flight", type=int, help="rows being served at once")
    parser.add_argument(
        "--rows",
        choices=("auto", "tensors", "records"),
        default="auto",
        help="how a columnar row becomes a request (default auto)",
    )
    parser.add_argument("--columns", help="comma-separated columns that make a record")
    parser.add_argument("--id-column", help="the column (or JSON key) that identifies a row")
    parser.add_argument("--timeout", type=float, help="each row's deadline in seconds")
    parser.add_argument(
        "--unordered", action="store_true", help="rows within a part in completion order"
    )
    parser.add_argument("--no-progress", action="store_true", help="show no progress")
    parser.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        help="seconds between progress lines when stderr is not a terminal (10)",
    )


def run_command(args: argparse.Namespace) -> int:
    """Run the job; 0 on success, 1 on failure, 130 when stopped by a signal."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # handler modules beside the caller, as python -m finds
    try:
        runtime, name = build_runtime(args)
    except MdsError as exc:
        print(f"mds batch: {exc}", file=sys.stderr)
        return 1
    try:
        return anyio.run(_main, runtime, name, args)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once
        print("mds batch: interrupted; run again with --resume to continue", file=sys.stderr)
        return 130


def build_runtime(args: argparse.Namespace) -> tuple[Runtime, str]:
    """The runtime serving ``args.target`` (a handler with ``--config``, or a pipeline file)."""
    runtime = Runtime()
    target = args.target
    if target.endswith((".yaml", ".yml")) and Path(target).is_file():
        pipeline = Pipeline.load(target)
        runtime.add_pipeline(pipeline)
        return runtime, pipeline.name
    config = None
    if args.config:
        try:
            data = Path(args.config).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the config file: {exc}") from None
        try:
            config = msgspec.yaml.decode(data, type=ModelConfig)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{args.config}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{args.config}: not valid YAML: {exc}") from None
    handler = resolve_handler(target, f"handler {target!r}")
    name = args.name or source_name(handler, config or ModelConfig())
    model = runtime.add_model(name, handler, config, version=args.model_version)
    return runtime, model.name


async def _main(runtime: Runtime, name: str, args: argparse.Namespace) -> int:
    try:
        async with runtime:
            job = Job(
                runtime.servable(name),
                args.input,
                args.output,
                format=args.format,
                output_format=args.output_format,
                ordered=not args.unordered,
                part_rows=args.part_rows,
                resume=args.resume,
                overwrite=args.overwrite,
                retry_failed=args.retry_failed,
                max_error_rate=args.max_error_rate,
                in_flight=args.in_flight,
                rows=args.rows,
                columns=args.columns.split(",") if args.columns else None,
                id_column=args.id_column,
                timeout=args.timeout,
                priority=None,
                progress=False if args.no_progress else True,
                progress_every=args.progress_every,
                fingerprint=None,
            )
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(_on_signals, job, tasks.cancel_scope)
                try:
                    report = await job.run()
                finally:
                    tasks.cancel_scope.cancel()
    except JobFailed as exc:
        if exc.report is not None:
            print(exc.report.summary(), file=sys.stderr)
        print(f"mds batch: {exc}; committed parts stay (--resume continues)", file=sys.stderr)
        return 1
    except MdsError as exc:
        print(f"mds batch: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    if report.stopped is not None:
        print(f"mds batch: {report.stopped}; run again with --resume to continue", file=sys.stderr)
        return 130
    return 0


async def _on_signals(job: Job, scope: anyio.CancelScope) -> None:
    """The first SIGINT or SIGTERM stops the job gracefully; a second stops it at once."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for received in signals:
            if job.stopped is None:
                job.stop(f"stopped by {signal.Signals(received).name}")
            else:
                raise KeyboardInterrupt
