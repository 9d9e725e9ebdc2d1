"""Logs an operator can use: public logger names, fields, one line per failure, rate limits."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

import mds
from mds import _logs

PACKAGE = Path(mds.__file__).resolve().parent

#: The loggers mds uses; the host configures them by these names.
LOGGERS = {
    "mds.model",
    "mds.batching",
    "mds.pipeline",
    "mds.runtime",
    "mds.devices",
    "mds.backends",
    "mds.repository",
    "mds.http",
    "mds.grpc",
    "mds.workers",
    "mds.metrics",
}


class Broken(mds.ModelHandler[int, int]):
    """Fails every item: a storm."""

    async def infer(self, batch: Sequence[int]) -> list[int]:
        raise ValueError(f"cannot compute {len(batch)} items")


class Picky(mds.ModelHandler[int, int]):
    """Fails 13 alone (its batch is split to find it); its postprocess fails on 14."""

    async def infer(self, batch: Sequence[int]) -> list[int]:
        if 13 in batch:
            raise ValueError("unlucky 13")
        return list(batch)

    async def postprocess(self, output: int) -> int:
        if output == 14:
            raise KeyError("no label for 14")
        return output


class Clock:
    """A clock that moves when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def failures(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[Any]:
    return [r for r in caplog.records if r.name == "mds.model" and r.levelno == level]


def test_the_rate_limit_lets_a_number_through_per_interval_and_counts_the_rest() -> None:
    clock = Clock()
    limit = _logs.RateLimit(3, 10.0, clock=clock)
    assert [limit.admit() for _ in range(5)] == [0, 0, 0, None, None]
    clock.now = 9.9
    assert limit.admit() is None
    clock.now = 10.0  # a new window: the three held back are reported with the next
    assert limit.admit() == 3
    assert limit.admit() == 0 and limit.admit() == 0 and limit.admit() is None
    assert limit.take_suppressed() == 1 and limit.take_suppressed() == 0


async def test_a_storm_of_failures_logs_a_few_lines_and_how_many_it_held_back(
    caplog: pytest.LogCaptureFixture, serve_all: Callable[..., Awaitable[list[Any]]]
) -> None:
    clock = Clock()
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=8))
    with caplog.at_level(logging.WARNING, logger="mds"):
        async with mds.ModelRuntime(Broken(), config, name="broken") as model:
            model._failures.limit = _logs.RateLimit(10, 10.0, clock=clock)
            results = await serve_all(model, list(range(1000)))
            assert all(isinstance(r, mds.InferenceError) for r in results)
            lines = failures(caplog)
            assert len(lines) == 10
            clock.now = 10.0
            with pytest.raises(mds.InferenceError):
                await model.serve(1)
    lines = failures(caplog)
    assert len(lines) == 12  # the note, then the failure that opened the new window
    note = lines[10].getMessage()
    assert note == (
        "model 'broken' (version 1): 990 more failed requests were not logged "
        "(at most 10 are logged per 10 s)"
    )
    first = lines[0].getMessage()
    assert first.startswith("request failed: InferenceError: model 'broken' (version 1)")
    assert "ValueError: cannot compute 1 items" in first and "(batch " in first
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.WARNING)
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_failure_is_one_warning_with_its_cause_and_a_traceback_at_debug(
    caplog: pytest.LogCaptureFixture, serve_all: Callable[..., Awaitable[list[Any]]]
) -> None:
    config = mds.ModelConfig(batching=mds.BatchingConfig(max_batch_size=4))
    with caplog.at_level(logging.DEBUG, logger="mds"):
        async with mds.ModelRuntime(Picky(), config, name="picky") as model:
            results = await serve_all(model, [11, 12, 13, 14])
    assert results[:2] == [11, 12]
    [infer, post] = sorted(failures(caplog), key=lambda r: r.getMessage())
    assert "infer failed" in infer.getMessage() and "ValueError: unlucky 13" in infer.getMessage()
    assert "postprocess failed: KeyError: 'no label for 14'" in post.getMessage()
    traced = [r for r in failures(caplog, logging.DEBUG) if r.exc_info is not None]
    causes = {type(r.exc_info[1]) for r in traced}
    assert {ValueError, KeyError} <= causes
    assert "unlucky 13" in caplog.text and "Traceback" in caplog.text


async def test_records_carry_the_model_version_batch_and_request_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="mds"):
        async with mds.ModelRuntime(Picky(), name="picky", version="7") as model:
            with _logs.request_id("req-1"), pytest.raises(mds.InferenceError):
                await model.serve(13)
    [line] = failures(caplog)
    assert (line.mds_model, line.mds_version, line.mds_request_id) == ("picky", "7", "req-1")
    assert isinstance(line.mds_batch, int) and line.mds_batch >= 1
    assert "request id req-1" in line.getMessage()
    states = [r for r in caplog.records if r.levelno == logging.INFO and "->" in r.getMessage()]
    assert [r.getMessage() for r in states] == [
        "model 'picky': created -> loading",
        "model 'picky': loading -> warming",
        "model 'picky': warming -> ready",
        "model 'picky': ready -> draining",
        "model 'picky': draining -> stopped",
    ]
    for record in [*states, line]:
        assert record.mds_model == "picky" and record.mds_version == "7"
        assert not hasattr(record, "mds_trace_id")  # no span here: a field only where known
    assert not hasattr(states[0], "mds_batch") and not hasattr(states[0], "mds_request_id")


async def test_a_failing_pipeline_function_is_logged_as_the_pipelines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(value: Any) -> Any:
        raise ValueError("no features")

    runtime = mds.Runtime()
    runtime.add_pipeline(mds.Pipeline("scoring", [mds.Node.function("features", broken)]))
    with caplog.at_level(logging.WARNING, logger="mds"):
        async with runtime:
            for _ in range(20):
                with pytest.raises(mds.InferenceError):
                    await runtime.serve("scoring", 1)
    lines = [r for r in caplog.records if r.name == "mds.pipeline"]
    assert len(lines) == 10  # the rest held back by the rate limit
    assert lines[0].levelno == logging.WARNING and lines[0].exc_info is None
    assert lines[0].getMessage() == (
        "request failed: InferenceError: pipeline 'scoring', node 'features': "
        "ValueError: no features"
    )
    assert lines[0].mds_pipeline == "scoring" and not hasattr(lines[0], "mds_model")


def test_a_log_line_names_the_current_trace() -> None:
    pytest.importorskip("opentelemetry.sdk.trace", reason="needs opentelemetry-sdk")
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("request") as span:
        fields = _logs.fields("m", "1")
    context = span.get_span_context()
    assert fields["mds_trace_id"] == format(context.trace_id, "032x")
    assert fields["mds_span_id"] == format(context.span_id, "016x")
    assert _logs.fields("m", "1") == {"mds_model": "m", "mds_version": "1"}


#: Imports every module of mds (those whose optional dependencies are there),
#: then prints each logger under mds with its handlers, level and propagation.
IMPORT_ALL = """
import importlib, json, logging, pkgutil
import mds
for info in pkgutil.walk_packages(mds.__path__, prefix="mds."):
    try:
        importlib.import_module(info.name)
    except ImportError:
        pass
names = [n for n in logging.Logger.manager.loggerDict if n == "mds" or n.startswith("mds.")]
loggers = {n: logging.getLogger(n) for n in {*names, "mds"}}
print(json.dumps({n: [len(g.handlers), g.level, g.propagate] for n, g in loggers.items()}))
"""


def test_every_logger_is_a_public_name_under_mds_and_none_has_a_handler() -> None:
    # In a process of its own: importing every module here would change what
    # `mds` holds for the other tests.
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, check=True
    )
    loggers = json.loads(done.stdout)
    assert set(loggers) <= LOGGERS | {"mds"}, sorted(set(loggers) - LOGGERS)
    assert {"mds.model", "mds.batching", "mds.pipeline", "mds.runtime"} <= set(loggers)
    for name, (handlers, level, propagate) in loggers.items():
        assert (handlers, level, propagate) == (0, logging.NOTSET, True), name


def test_each_module_names_its_logger_with_a_public_name() -> None:
    """A literal ``getLogger("mds.<part>")``, never a private module path."""
    found: dict[str, str] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "getLogger"
            ):
                [arg] = node.args
                assert isinstance(arg, ast.Constant), f"{path}: getLogger({ast.unparse(arg)})"
                found[str(path.relative_to(PACKAGE))] = arg.value
    assert set(found.values()) <= LOGGERS | {"mds"}, found


def test_nothing_prints_but_the_command_line() -> None:
    # mds, mds batch, mds worker, mds demo
    command_line = {
        "__main__.py", "_batch/command.py", "_workers/command.py", "_demo.py", "_server_command.py"
    }  # fmt: skip
    printing = []
    for path in PACKAGE.rglob("*.py"):
        if str(path.relative_to(PACKAGE)) in command_line:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                printing.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert printing == []
