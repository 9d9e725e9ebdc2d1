"""Batch serving: a model or pipeline over a whole data set, resumable, in order.

The same handlers, pipelines, batching and lifecycle as real-time serving;
no one waits, and many rows are computed at once::

    async with mds.Runtime() as runtime:  # with a model "scorer" added
        report = await mds.batch.run(runtime.servable("scorer"), "rows.parquet", "scores/")

Input: a JSON Lines, CSV or Parquet file (or a folder of Parquet files), a
data frame (pandas, polars, a pyarrow table: anything that exports an
Arrow stream), or an iterable or async iterable of requests. Output: a
folder of parts, each committed whole (written, then renamed), with a
ledger that lets a killed run resume where it stopped, and
``_errors.jsonl`` listing every row that failed. CSV, Parquet and frames
need ``pyarrow`` (``pip install "mds-serving[arrow]"``).

See the "Batch serving" page of the docs. Added in 0.3.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from ._batch.job import Job, JobFailed, Report
from ._batch.progress import Progress
from ._batch.sources import Rows
from ._errors import LifecycleError
from ._servable import Servable

__all__ = ["JobFailed", "Progress", "Report", "run", "run_sync"]


async def run(
    target: Servable,
    source: Any,
    output: str | os.PathLike[str],
    *,
    format: str | None = None,
    output_format: str | None = None,
    ordered: bool = True,
    part_rows: int = 10_000,
    resume: bool = False,
    overwrite: bool = False,
    retry_failed: bool = False,
    max_error_rate: float | None = None,
    in_flight: int | None = None,
    rows: Rows = "auto",
    columns: Sequence[str] | None = None,
    id_column: str | None = None,
    timeout: float | None = None,
    priority: int | None = None,
    progress: bool | Callable[[Progress], None] | None = None,
    progress_every: float = 10.0,
    fingerprint: str | None = None,
) -> Report:
    """Serve every row of ``source`` through ``target``; write the responses under ``output``.

    Each row is one request through the servable's ``serve`` (its batcher,
    deadlines and error isolation), with ``in_flight`` rows at a time, so
    rows batch together and memory stays flat however long the input.
    Each ``part_rows`` rows of input make one part of the output
    (``part-00000.parquet``, ...), committed whole once every row of it has
    an outcome. Row ``i`` of the concatenated parts answers row ``i`` of
    the input (with ``ordered=False``, rows within a part are in the order
    they finished); every output row carries its input row's ``index`` (and
    its id, with ``id_column``). A row that fails is kept, with its error
    and a null response, and listed in ``_errors.jsonl``; the others go on.

    Args:
        target: the model or pipeline (``runtime.servable(name)``); its
            runtime must be running.
        source: a path (``.jsonl``, ``.csv``, ``.parquet``, or a folder of
            Parquet files), a data frame, or an iterable or async iterable of
            requests. A JSON Lines line is a request as mds's JSON route
            takes its body. A columnar row is given as a dict of its columns,
            or, for a model that declares its inputs (its ``signature``) when
            the input has a column for each, as named tensors through its
            ``from_tensors`` (as the Open Inference Protocol does).
        output: the output folder; created if need be.
        format: the input's format when its name does not say
            (``jsonl``, ``csv``, ``parquet``).
        output_format: the output's format; defaults to the output folder's
            suffix (``scores.parquet/``), else the input's, else JSON Lines
            for requests and Parquet for frames.
        ordered: rows within each part in input order (else in completion order).
        part_rows: input rows per committed part.
        resume: continue the job whose output is in ``output``: committed
            parts are checked against the input and skipped. Refused (with
            :class:`ConfigError`) if the servable, its version or config,
            the input, or the chunking changed.
        overwrite: delete an earlier job's output in ``output`` first.
        retry_failed: when resuming, serve again the rows that failed.
        max_error_rate: stop (with :class:`JobFailed`) once more than this
            share of the rows served has failed (judged after 100 rows).
        in_flight: rows being served at once; defaults to twice what every
            instance's batches hold (at least 64, at most the queue's size).
        rows: how a columnar row becomes a request: ``"records"`` (a dict of
            its columns), ``"tensors"`` (named tensors through
            ``from_tensors``), or ``"auto"`` (tensors where the model
            declares inputs that the columns hold).
        columns: the columns that make up a record (default: all but the id).
        id_column: a column (or JSON key) that identifies each row; it is
            carried to the output row and the error file.
        timeout: each row's deadline, as for ``serve``.
        priority: each row's priority level, as for ``serve`` (batch jobs
            beside live traffic may take a low one).
        progress: ``True`` to show progress on stderr (a line redrawn on a
            terminal, a line every ``progress_every`` seconds elsewhere),
            ``False`` for none, a callable to be given a :class:`Progress`
            about five times a second; ``None`` shows it on a terminal only.
        progress_every: seconds between progress lines when stderr is not a terminal.
        fingerprint: your own mark of what made the output (such as the
            weights' hash); a resumed run must give the same.

    Returns:
        The :class:`Report`.

    Raises:
        ConfigError: bad options, an unreadable input, or an output folder
            that holds another job's output.
        JobFailed: the job stopped early (too many errors; the model went
            away; the input could not be read on). What was committed stays.
        NotReady: the servable is not running.

    Stopping it (Ctrl-C in :func:`run_sync`, cancelling this call) keeps
    the committed parts; run again with ``resume=True`` to go on.
    """
    job = Job(target, source, output, **_options(locals()))
    home = getattr(target, "_home", None)
    if home is None or hasattr(source, "__aiter__"):
        return await job.run()
    # The job runs in the servable's own loop: no hop per row.
    result: Report = await home.call(job.run)
    return result


def run_sync(
    target: Servable,
    source: Any,
    output: str | os.PathLike[str],
    *,
    format: str | None = None,
    output_format: str | None = None,
    ordered: bool = True,
    part_rows: int = 10_000,
    resume: bool = False,
    overwrite: bool = False,
    retry_failed: bool = False,
    max_error_rate: float | None = None,
    in_flight: int | None = None,
    rows: Rows = "auto",
    columns: Sequence[str] | None = None,
    id_column: str | None = None,
    timeout: float | None = None,
    priority: int | None = None,
    progress: bool | Callable[[Progress], None] | None = None,
    progress_every: float = 10.0,
    fingerprint: str | None = None,
) -> Report:
    """Blocking form of :func:`run`, for scripts and notebooks (a runtime in ``start_sync``).

    Ctrl-C stops the job gracefully: rows in flight finish, complete parts
    are committed, then ``KeyboardInterrupt`` is raised; a second Ctrl-C
    stops at once. Either way, ``resume=True`` goes on from there.
    """
    if hasattr(source, "__aiter__"):
        raise TypeError("run_sync reads sync iterables; await mds.batch.run() for an async one")
    job = Job(target, source, output, **_options(locals()))
    home = getattr(target, "_home", None)
    if home is None:
        raise LifecycleError(
            f"{target.name!r} is not an mds model or pipeline; await mds.batch.run() instead"
        )
    future = home.submit(job.run)
    try:
        result: Report = future.result()
    except KeyboardInterrupt:
        home.portal.call(job.stop, "interrupted (Ctrl-C)")
        try:  # rows in flight finish and complete parts are committed
            future.result()
        except KeyboardInterrupt:
            future.cancel()
        except Exception:
            pass  # what the run says after a stop adds nothing to the interrupt
        raise
    return result


def _options(given: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in given.items() if k not in ("target", "source", "output")}


# Reprs and tracebacks show the public path, not the private module.
for _obj in (JobFailed, Progress, Report):
    _obj.__module__ = __name__
del _obj
