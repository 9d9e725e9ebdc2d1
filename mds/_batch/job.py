"""A batch job: read chunks, serve their rows, commit each part, report.

The pieces stay apart so that another engine can drive them: a
:class:`~.sources.Source` reads chunks, the :class:`~.engine.Engine` serves
them, a :class:`~.parts.Writer` writes a part and the
:class:`~.ledger.Ledger` commits it. This module only wires them together in
the servable's own event loop.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec

from .._errors import ConfigError, MdsError, NotReady, describe
from .._servable import Servable
from .._versions import ModelVersions
from .engine import Engine, Work, default_workers
from .ledger import ERRORS, Ledger, now_text
from .parts import Rows, Writer, error_fields
from .progress import Display, Progress
from .sources import Chunk, Source, format_of, open_source

__all__ = ["Job", "JobFailed", "Report"]

#: Rows served before the error rate is judged.
MIN_ROWS_FOR_RATE = 100


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """What a batch job did, returned by :func:`mds.batch.run`.

    Attributes:
        target: the model or pipeline that served the rows.
        output: the output folder.
        rows: rows of the input this run went through (served or skipped).
        done: rows served successfully by this run.
        failed: rows that failed in this run (each is in ``errors_file``).
        skipped: rows of parts an earlier run had committed.
        retried: rows that had failed before and were served again.
        parts: parts committed by this run.
        seconds: how long the run took.
        rows_per_second: rows served (done or failed) per second.
        complete: every row of the input has its output row.
        stopped: why the run stopped before the end; ``None`` if it did not.
        errors_file: the file listing every failed row of the job.

    Added in 0.3.
    """

    target: str
    output: str
    rows: int
    done: int
    failed: int
    skipped: int
    retried: int
    parts: int
    seconds: float
    rows_per_second: float
    complete: bool
    stopped: str | None
    errors_file: str

    def summary(self) -> str:
        """The report in a few lines, as ``mds batch`` prints it."""
        state = "complete" if self.complete else f"incomplete ({self.stopped or 'stopped'})"
        lines = [
            f"{self.target}: {state}; {self.rows:,} rows in {self.seconds:.1f} s "
            f"({self.rows_per_second:,.0f} rows/s)",
            f"  done {self.done:,}, failed {self.failed:,}, skipped {self.skipped:,} "
            f"(committed earlier), retried {self.retried:,}; {self.parts:,} parts committed",
            f"  output: {self.output}",
        ]
        if self.failed:
            lines.append(f"  failed rows: {self.errors_file}")
        return "\n".join(lines)


class JobFailed(MdsError):
    """A batch job stopped before the end: too many rows failed, or the model went away.

    What was committed stays committed: run the job again with
    ``resume=True`` to continue. ``report`` says how far it got.

    Added in 0.3.
    """

    report: Report | None = None


class Job:
    """One run of a batch job. See :func:`mds.batch.run` for the arguments."""

    def __init__(
        self,
        target: Servable,
        source: Any,
        output: str | os.PathLike[str],
        *,
        format: str | None,
        output_format: str | None,
        ordered: bool,
        part_rows: int,
        resume: bool,
        overwrite: bool,
        retry_failed: bool,
        max_error_rate: float | None,
        in_flight: int | None,
        rows: Any,
        columns: Sequence[str] | None,
        id_column: str | None,
        timeout: float | None,
        priority: int | None,
        progress: bool | Callable[[Progress], None] | None,
        progress_every: float,
        fingerprint: str | None,
    ) -> None:
        if part_rows < 1:
            raise ConfigError(f"part_rows must be at least 1, got {part_rows}")
        if max_error_rate is not None and not 0.0 <= max_error_rate <= 1.0:
            raise ConfigError(f"max_error_rate must be between 0 and 1, got {max_error_rate}")
        if in_flight is not None and in_flight < 1:
            raise ConfigError(f"in_flight must be at least 1, got {in_flight}")
        if resume and overwrite:
            raise ConfigError("resume and overwrite cannot both be set")
        self.target, self.raw_source, self.folder = target, source, Path(os.fspath(output))
        self.format, self.output_format = format, output_format
        self.ordered, self.part_rows = ordered, part_rows
        self.resume, self.overwrite, self.retry_failed = resume, overwrite, retry_failed
        self.max_error_rate, self.in_flight = max_error_rate, in_flight
        self.rows, self.columns, self.id_column = rows, columns, id_column
        self.timeout, self.priority = timeout, priority
        self.progress, self.progress_every = progress, progress_every
        self.fingerprint = fingerprint
        self.done = self.failed = self.skipped = self.retried = self.parts = 0
        self.began = 0.0
        self.stopped: str | None = None
        self.failure: BaseException | None = None
        self.engine: Engine | None = None
        self.complete = False
        self.total: int | None = None
        self.display = self._display()

    def stop(self, reason: str) -> None:
        """Stop reading; rows in flight finish and complete parts are committed."""
        if self.stopped is None:
            self.stopped = reason
        if self.engine is not None:
            self.engine.stop()

    # -- the run --------------------------------------------------------------

    async def run(self) -> Report:
        if isinstance(self.target, ModelVersions):
            # One version for the whole job: a swap meanwhile does not mix outputs.
            self.target = self.target.pinned(self.target.version)
        target = self.target
        if not target.ready:
            raise NotReady(
                f"{target.name!r} is not ready ({target.state.value}); start its runtime "
                "before running a job over it"
            )
        self.began = time.perf_counter()
        source = await anyio.to_thread.run_sync(self._open)
        self.total = source.total
        fmt = self._output_format(source)
        manifest = self._manifest(source, fmt)
        writer = Writer(
            self.folder, fmt, target, tensors=source.mode == "tensors", id_column=self.id_column
        )

        def open_ledger() -> tuple[Ledger, dict[int, set[int]]]:
            ledger = Ledger.open(
                self.folder, manifest, resume=self.resume, overwrite=self.overwrite
            )
            if ledger.entries:
                writer.remember(min(ledger.entries))
            return ledger, (ledger.failed_rows() if self.retry_failed else {})

        ledger, failed_rows = await anyio.to_thread.run_sync(open_ledger)
        # Committed parts are only checked against the input: no requests made.
        self._skip = frozenset(n for n in ledger.entries if n not in failed_rows)
        workers = self.in_flight or default_workers(target)
        send, receive = anyio.create_memory_object_stream[Work](math.inf)
        read, chunks = anyio.create_memory_object_stream[Chunk | BaseException | None](1)
        self.engine = engine = Engine(
            target,
            self._chunks(chunks, ledger, failed_rows),
            send.send,
            self._count,
            workers=workers,
            open_chunks=3,
            ordered=self.ordered,
            timeout=self.timeout,
            priority=self.priority,
        )
        if self.stopped is not None:
            engine.stop()
        over = anyio.Event()
        self._reading = anyio.CancelScope()
        with receive, chunks:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._read, source, read)
                tasks.start_soon(self._commit_all, receive, writer, ledger, engine, failed_rows)
                tasks.start_soon(self._show, over)
                try:
                    await engine.run()
                finally:
                    self._reading.cancel()
                    send.close()
                    over.set()
        if engine.error is not None and self.failure is None:
            self.failure = engine.error
        if self.failure is None and self.stopped is None:
            await anyio.to_thread.run_sync(ledger.finish)
            self.complete = True
        self._show_last()
        report = self.report()
        if self.failure is not None:
            if isinstance(self.failure, ConfigError):
                raise self.failure
            reason = (
                describe(self.failure)
                if not isinstance(self.failure, MdsError)
                else str(self.failure)
            )
            failed = JobFailed(f"the job stopped: {reason}")
            failed.report = report
            raise failed from self.failure
        if self.stopped is not None and self.stopped.startswith("too many"):
            failed = JobFailed(f"the job stopped: {self.stopped}")
            failed.report = report
            raise failed
        return report

    def _open(self) -> Source:
        return open_source(
            self.raw_source,
            self.target,
            format=self.format,
            rows=self.rows,
            columns=self.columns,
            id_column=self.id_column,
        )

    def _output_format(self, source: Source) -> str:
        if self.output_format is not None:
            return format_of(self.folder, self.output_format, "output")
        named = self.folder.suffix.lower().lstrip(".")
        if named in ("jsonl", "csv", "parquet"):
            return named
        if source.kind in ("jsonl", "csv", "parquet"):
            return source.kind
        return "parquet" if source.kind == "frame" else "jsonl"

    def _manifest(self, source: Source, fmt: str) -> dict[str, Any]:
        return {
            "mds_batch": 1,
            "created": now_text(),
            "target": describe_target(self.target),
            "input": {
                **source.describe(),
                "columns": list(self.columns) if self.columns else None,
                "id_column": self.id_column,
            },
            "part_rows": self.part_rows,
            "output_format": fmt,
            "ordered": self.ordered,
            "fingerprint": self.fingerprint,
        }

    async def _chunks(
        self, receive: Any, ledger: Ledger, failed_rows: dict[int, set[int]]
    ) -> AsyncIterator[tuple[Chunk, list[int] | None]]:
        """The chunks left to serve: committed ones are checked against the input and skipped."""
        last = -1
        while (chunk := await receive.receive()) is not None:
            if isinstance(chunk, BaseException):
                raise chunk
            last = chunk.number
            entry = ledger.entries.get(chunk.number)
            if entry is None:
                yield chunk, None
                continue
            if (entry.start, entry.rows, entry.crc) != (
                chunk.start,
                chunk.rows,
                chunk.crc,
            ):
                raise ConfigError(
                    f"cannot resume the job in {str(self.folder)!r}: the input changed since "
                    f"part {chunk.number} (rows {entry.start} to {entry.start + entry.rows - 1}) "
                    "was committed; use a new output folder, or overwrite=True"
                )
            retry = failed_rows.get(chunk.number)
            if retry:
                yield chunk, sorted(index - chunk.start for index in retry)
            else:
                self.skipped += entry.rows
        beyond = [number for number in ledger.entries if number > last]
        if beyond:
            raise ConfigError(
                f"cannot resume the job in {str(self.folder)!r}: the input has fewer rows than "
                f"when part {beyond[0]} was committed; use a new output folder, or overwrite=True"
            )

    async def _read(self, source: Source, send: Any) -> None:
        """Read chunks into ``send`` (one ahead of the engine), in a thread where it blocks."""
        with anyio.CancelScope() as self._reading, send:
            try:
                direct = source.achunks(self.part_rows)
                if direct is not None:
                    async for chunk in direct:
                        await send.send(chunk)
                else:
                    chunks = source.chunks(self.part_rows, self._skip)
                    try:
                        while (
                            got := await anyio.to_thread.run_sync(next, chunks, None)
                        ) is not None:
                            await send.send(got)
                    finally:
                        close = getattr(chunks, "close", None)
                        if close is not None:
                            close()
                await send.send(None)
            except MdsError as exc:
                await send.send(exc)
            except Exception as exc:
                await send.send(JobFailed(f"reading the input failed: {describe(exc)}"))

    def _count(self, outcome: Any) -> None:
        if isinstance(outcome, MdsError):
            self.failed += 1
            rate = self.max_error_rate
            served = self.done + self.failed
            if rate is not None and served >= MIN_ROWS_FOR_RATE and self.failed > rate * served:
                self.stop(
                    f"too many rows failed: {self.failed:,} of {served:,} "
                    f"({self.failed / served:.1%}, more than max_error_rate {rate:.1%})"
                )
        else:
            self.done += 1

    async def _commit_all(
        self,
        works: Any,
        writer: Writer,
        ledger: Ledger,
        engine: Engine,
        failed_rows: dict[int, set[int]],
    ) -> None:
        async for work in works:
            try:
                if self.failure is None:
                    await anyio.to_thread.run_sync(self._commit, work, writer, ledger, failed_rows)
            except Exception as exc:
                self.failure = exc
                engine.stop()
            finally:
                engine.release()

    def _commit(
        self, work: Work, writer: Writer, ledger: Ledger, failed_rows: dict[int, set[int]]
    ) -> None:
        chunk = work.chunk
        served = work.rows()
        if chunk.number in ledger.entries:  # failed rows, served again
            rows = _rows(chunk, served, work.outcomes)
            failed = writer.replace(chunk.number, rows, self.ordered)
            ledger.recommit(chunk.number, _described(failed), {chunk.start + i for i in served})
            self.retried += len(served)
        else:
            failed = writer.write(chunk.number, _rows(chunk, served, work.outcomes))
            ledger.commit(
                chunk.number,
                chunk.start,
                chunk.rows,
                chunk.crc,
                writer.format,
                _described(failed),
            )
        # Rows whose response could not be written count as failed, as they are recorded.
        late = len(failed) - sum(isinstance(work.outcomes[i], MdsError) for i in served)
        if late > 0:
            self.done -= late
            self.failed += late
        self.parts += 1

    # -- progress and the report ---------------------------------------------

    def snapshot(self) -> Progress:
        seconds = time.perf_counter() - self.began
        served = self.done + self.failed
        rate = served / seconds if seconds > 0 else 0.0
        eta = None
        if self.total is not None and rate > 0:
            eta = max(self.total - served - self.skipped, 0) / rate
        return Progress(
            done=self.done,
            failed=self.failed,
            skipped=self.skipped,
            total=self.total,
            seconds=seconds,
            rows_per_second=rate,
            eta=eta,
        )

    def _display(self) -> Display | None:
        wanted = self.progress
        if wanted is False or callable(wanted):
            return None
        display = Display(f"mds batch {self.target.name}", every=self.progress_every)
        if wanted is None and not display.tty:
            return None
        return display

    async def _show(self, over: anyio.Event) -> None:
        callback = self.progress if callable(self.progress) else None
        display = self.display
        if display is None and callback is None:
            return
        while not over.is_set():
            with anyio.move_on_after(0.2):
                await over.wait()
            progress = self.snapshot()
            if callback is not None:
                callback(progress)
            if display is not None and display.due(progress.seconds):
                display.show(progress)

    def _show_last(self) -> None:
        progress = self.snapshot()
        if callable(self.progress):
            self.progress(progress)
        if self.display is not None:
            self.display.show(progress, final=True)

    def report(self) -> Report:
        seconds = time.perf_counter() - self.began
        served = self.done + self.failed
        return Report(
            target=self.target.name,
            output=str(self.folder),
            rows=served - self.retried + self.skipped,
            done=self.done,
            failed=self.failed,
            skipped=self.skipped,
            retried=self.retried,
            parts=self.parts,
            seconds=seconds,
            rows_per_second=served / seconds if seconds > 0 else 0.0,
            complete=self.complete,
            stopped=self.stopped,
            errors_file=str(self.folder / ERRORS),
        )


def _rows(chunk: Chunk, served: list[int], outcomes: list[Any]) -> Rows:
    ids = chunk.ids
    return Rows(
        [chunk.start + i for i in served],
        [ids[i] for i in served] if ids is not None else None,
        [outcomes[i] for i in served],
    )


def _described(failed: list[tuple[int, Any, MdsError]]) -> list[tuple[int, Any, str, str]]:
    return [(index, row_id, *error_fields(error)) for index, row_id, error in failed]


def describe_target(target: Servable) -> dict[str, Any]:
    """What made the output, as far as a resumed run must match it."""
    current = getattr(target, "_current", None)
    if current is not None:  # a model's versions, or one of them: the version itself
        target = current()
    described: dict[str, Any] = {
        "name": target.name,
        "version": target.version,
        "kind": type(target).__name__,
    }
    config = getattr(target, "config", None)
    if config is not None:
        described["handler"] = _handler_name(getattr(target, "_source", None))
        described["config"] = msgspec.to_builtins(config, enc_hook=repr)
    pipeline = getattr(target, "pipeline", None)
    if pipeline is not None:
        described["graph"] = pipeline.to_text()
        models = getattr(target, "models", {})
        described["models"] = {name: describe_target(model) for name, model in models.items()}
    return described


def _handler_name(source: Any) -> str | None:
    if source is None:
        return None
    kind = source if isinstance(source, type) else type(source)
    if callable(source) and not isinstance(source, type) and hasattr(source, "__qualname__"):
        kind = source
    return f"{kind.__module__}:{kind.__qualname__}"
