"""A runtime in a Ray Data job: ``Dataset.map_batches`` with actors that each hold a runtime.

Each actor makes its runtime once (``build``) and starts it; each block of
rows is turned into requests as ``mds.batch`` reads a Parquet file (records,
or named tensors for a model that declares its inputs), served together
through the runtime's batcher, and returned as the columns ``mds.batch``
writes: the response (or its fields), ``error_type`` and ``error``. A row
that fails fills those two and leaves the response null: it does not fail
the block, and so the job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._batch.engine import default_workers
from .._batch.parts import Rows, Writer
from .._batch.sources import ArrowFile, Refused, open_source
from .._batch.sources import Rows as RowKind
from .._deps import require
from .._errors import ConfigError, InferenceError, MdsError, describe
from .._runtime import Runtime

__all__ = ["ServeBatches", "map_dataset"]


class ServeBatches:
    """A callable class for ``Dataset.map_batches``: each actor serves blocks through its runtime.

    Args:
        build: makes the runtime, with the model or pipeline added; runs once
            per actor (a module-level function, importable on the workers).
        target: the model's or pipeline's name.
        rows: how a row becomes a request: ``"records"`` (``{column:
            value}``), ``"tensors"`` (named tensors, for a model that
            declares its inputs), or ``"auto"`` (tensors when every input
            has a column), as ``mds.batch.run``.
        columns: the columns a request is made of (all but the id by default).
        id_column: a column copied to the output beside each row's outcome.
        timeout: each row's deadline in seconds (the model's by default).

    Example:
        >>> ds.map_batches(mds.ray.ServeBatches, fn_constructor_kwargs={"build": build,
        ...     "target": "scorer"}, batch_format="pyarrow", concurrency=2)

    Added in 0.5.
    """

    def __init__(
        self,
        build: Callable[[], Runtime],
        target: str,
        *,
        rows: RowKind = "auto",
        columns: Sequence[str] | None = None,
        id_column: str | None = None,
        timeout: float | None = None,
    ) -> None:
        runtime = build()
        if not isinstance(runtime, Runtime):
            raise ConfigError(f"build() returned a {type(runtime).__name__}, not an mds.Runtime")
        self.runtime = runtime
        self.target_name = target
        self.rows: RowKind = rows
        self.columns = list(columns) if columns is not None else None
        self.id_column = id_column
        self.timeout = timeout
        runtime.start_sync()  # in mds's own loop: the actor's thread calls it blocking
        self.target = runtime.servable(target)
        self._writer: Writer | None = None

    def __call__(self, batch: Any) -> Any:
        """The outcome of each row of ``batch`` (an Arrow table), in its order."""
        pa = require("pyarrow", feature="mds.ray's Ray Data jobs")
        if not isinstance(batch, pa.Table):
            batch = pa.table(batch)  # a dict of numpy arrays (batch_format="numpy")
        source = open_source(
            batch, self.target, rows=self.rows, columns=self.columns, id_column=self.id_column
        )
        assert isinstance(source, ArrowFile)
        if self._writer is None:
            self._writer = Writer(
                Path("."),
                "parquet",
                self.target,
                tensors=source.mode == "tensors",
                id_column=self.id_column,
            )
        outcomes: list[Any] = []
        ids: list[Any] = []
        # Rows in flight bounded as mds.batch bounds them: a block larger than
        # the model's queue would have its excess refused as Overloaded.
        for chunk in source.chunks(max(1, min(batch.num_rows, default_workers(self.target)))):
            requests = chunk.requests
            wanted = [i for i, r in enumerate(requests) if not isinstance(r, Refused)]
            served = self.target.serve_many_sync(
                [requests[i] for i in wanted], timeout=self.timeout
            )
            found: list[Any] = [r.error if isinstance(r, Refused) else None for r in requests]
            for i, outcome in zip(wanted, served, strict=True):
                found[i] = outcome
            outcomes += [_outcome(o) for o in found]
            ids += chunk.ids if chunk.ids is not None else []
        rows = Rows(list(range(len(outcomes))), ids if self.id_column else None, outcomes)
        values, failed = self._writer._values(rows)
        table = self._writer._table(rows, values, failed).drop_columns(["index"])
        return self._with_outputs(table, pa)

    def _with_outputs(self, table: Any, pa: Any) -> Any:
        """``table`` with a column for each declared output, null where it has none.

        A block whose every row failed has no response columns of its own;
        a model that declares its outputs (its signature) gets them anyway,
        so that every block has the same columns.
        """
        signature = self.target.signature()
        if signature is None or self._writer is None or not self._writer.tensors:
            return table
        for name, spec in signature[1].items():
            if name not in table.column_names:
                position = table.num_columns - 2  # before error_type and error
                table = table.add_column(position, name, pa.nulls(table.num_rows, _arrow(pa, spec)))
        return table

    def __del__(self) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is not None and runtime.running:
            try:
                runtime.stop_sync()
            except Exception:  # the interpreter may be going: nothing to drain into
                pass


def _arrow(pa: Any, spec: Any) -> Any:
    """The Arrow type of a declared output: its dtype, in fixed-size lists for its shape."""
    kind = (
        pa.string()
        if spec.dtype in ("object", "str", "bytes")
        else pa.from_numpy_dtype(np.dtype(spec.dtype))
    )
    for size in reversed(tuple(spec.shape)):
        kind = pa.list_(kind, int(size)) if isinstance(size, int) and size > 0 else pa.list_(kind)
    return kind


def _outcome(found: Any) -> Any:
    """A row's response, or its error as an :class:`MdsError` (what the writer records)."""
    if isinstance(found, BaseException) and not isinstance(found, MdsError):
        return InferenceError(describe(found))
    return found


def map_dataset(
    dataset: Any,
    build: Callable[[], Runtime],
    target: str,
    *,
    ordered: bool = True,
    batch_size: int = 1024,
    concurrency: int | tuple[int, int] = 1,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    rows: RowKind = "auto",
    columns: Sequence[str] | None = None,
    id_column: str | None = None,
    timeout: float | None = None,
    **options: Any,
) -> Any:
    """``dataset`` with each row's outcome from ``target``: :class:`ServeBatches` on actors.

    ``concurrency`` actors (a number, or ``(least, most)`` to autoscale)
    each hold a runtime (each with ``num_cpus`` and ``num_gpus``);
    ``options`` go to ``map_batches``. ``ordered`` (the default) keeps the
    rows in the input's order, as ``mds.batch`` does: it sets Ray Data's
    ``preserve_order`` in ``dataset``'s own context (Ray reorders blocks
    otherwise), and nowhere else.

    Raises:
        MissingDependency: Ray Data is not installed (``pip install "mds-serving[ray]"``).

    Added in 0.5.
    """
    data = require("ray.data", feature="mds.ray")
    # The dataset's own context: the global one was copied into it when it was made.
    dataset.context.execution_options.preserve_order = ordered
    least, most = concurrency if isinstance(concurrency, tuple) else (concurrency, concurrency)
    resources = {
        key: value
        for key, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus))
        if value is not None
    }
    return dataset.map_batches(
        ServeBatches,
        fn_constructor_kwargs={
            "build": build,
            "target": target,
            "rows": rows,
            "columns": columns,
            "id_column": id_column,
            "timeout": timeout,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=data.ActorPoolStrategy(min_size=least, max_size=most),
        **resources,
        **options,
    )
