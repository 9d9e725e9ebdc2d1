"""A batch job's output, one part per chunk of input, each written whole then renamed.

Every output row carries its input row's ``index`` (and ``id`` when the
input names an id column), the response, and the error when it failed:
JSON Lines rows are ``{"index", "id", "response", "error"}`` with the
error as ``{"type", "message"}``; columnar rows (Parquet, CSV) have one
column per output (a response that is a dict gives a column per key), and
``error_type`` and ``error`` columns that are null where the row succeeded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from .._deps import require
from .._errors import InferenceError, MdsError, describe, excerpt
from .._named import output_namer
from .._servable import Servable

__all__ = ["Rows", "Writer", "part_name"]

#: The longest error message kept per row.
MAX_MESSAGE = 2000


def part_name(number: int, format: str) -> str:
    return f"part-{number:05d}.{format}"


class Rows:
    """One part's rows as written: input indices, ids, and each row's outcome, in order."""

    __slots__ = ("ids", "indices", "outcomes")

    def __init__(self, indices: list[int], ids: list[Any] | None, outcomes: list[Any]) -> None:
        self.indices, self.ids, self.outcomes = indices, ids, outcomes


def error_fields(error: MdsError) -> tuple[str, str]:
    return type(error).__name__, excerpt(str(error), MAX_MESSAGE)


def _builtin(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if hasattr(value, "detach") and hasattr(value, "tolist"):  # a torch tensor
        return value.detach().cpu().tolist()
    raise NotImplementedError(f"cannot encode {type(value).__name__} as JSON")


_json = msgspec.json.Encoder(enc_hook=_builtin)


class Writer:
    """Writes parts of one format into a folder; each appears whole or not at all.

    Args:
        folder: the output folder.
        format: ``jsonl``, ``csv`` or ``parquet``.
        target: the servable whose responses these are.
        tensors: write each response's named output tensors (``to_tensors``)
            rather than the response itself.
        id_column: the name of the id column, if the input has one.
    """

    def __init__(
        self, folder: Path, format: str, target: Servable, *, tensors: bool, id_column: str | None
    ) -> None:
        self.folder, self.format, self.target = folder, format, target
        self.tensors, self.id_column = tensors, id_column
        self.schema: Any = None  # the first columnar part's, kept by the others
        if format != "jsonl":
            self.pa = require("pyarrow", feature=f"writing {format}")

    def path(self, number: int) -> Path:
        return self.folder / part_name(number, self.format)

    def write(self, number: int, rows: Rows) -> list[tuple[int, Any, MdsError]]:
        """Write part ``number`` atomically; the rows that failed, with their errors."""
        return self.write_to(self.path(number), rows)

    def _id(self, rows: Rows, i: int) -> Any:
        return rows.ids[i] if rows.ids is not None else None

    def _values(self, rows: Rows) -> tuple[list[Any], dict[int, MdsError]]:
        """What each row's response is written as, and the rows that failed (or cannot be)."""
        values: list[Any] = []
        failed: dict[int, MdsError] = {}
        value = output_namer(self.target) if self.tensors else None
        for i, outcome in enumerate(rows.outcomes):
            if isinstance(outcome, MdsError):
                failed[i] = outcome
                values.append(None)
                continue
            try:
                values.append(value(outcome) if value is not None else outcome)
            except MdsError as exc:
                failed[i] = self.target.add_context(exc)
                values.append(None)
        return values, failed

    # -- JSON Lines ------------------------------------------------------------

    def _jsonl(self, rows: Rows, values: list[Any], failed: dict[int, MdsError]) -> bytes:
        lines: list[bytes] = []
        with_id = self.id_column is not None
        for i, value in enumerate(values):
            line: dict[str, Any] = {"index": rows.indices[i]}
            if with_id:
                line["id"] = self._id(rows, i)
            error = failed.get(i)
            if error is None:
                try:
                    encoded = _json.encode({**line, "response": value, "error": None})
                except (NotImplementedError, TypeError, ValueError, OverflowError) as exc:
                    error = failed[i] = self.target.add_context(
                        InferenceError(f"the response cannot be written as JSON: {describe(exc)}")
                    )
                else:
                    lines.append(encoded)
                    continue
            kind, message = error_fields(error)
            error_body = {"type": kind, "message": message}
            lines.append(_json.encode({**line, "response": None, "error": error_body}))
        return b"\n".join(lines) + b"\n" if lines else b""

    # -- columns ----------------------------------------------------------------

    def _table(self, rows: Rows, values: list[Any], failed: dict[int, MdsError]) -> Any:
        pa = self.pa
        count = len(values)
        ok = np.ones(count, dtype=bool)
        ok[list(failed)] = False
        columns: dict[str, Any] = {"index": pa.array(rows.indices, type=pa.int64())}
        if self.id_column is not None:
            columns[self.id_column] = pa.array(rows.ids)
        dicts = [v for v, good in zip(values, ok, strict=True) if good]
        if dicts and all(isinstance(v, dict) or isinstance(v, Mapping) for v in dicts):
            first = dicts[0].keys()
            if all(v.keys() == first for v in dicts):  # the usual case: one set of outputs
                keys = dict.fromkeys(str(k) for k in first)
            else:
                keys = {}
                for value in dicts:
                    keys.update(dict.fromkeys(str(k) for k in value))
            for key in keys:
                column = [v.get(key) if v is not None else None for v in values]
                columns[_free(key, columns)] = self._column(column, ok)
        elif dicts:
            columns[_free("response", columns)] = self._column(values, ok)
        kinds = [error_fields(failed[i]) if i in failed else (None, None) for i in range(count)]
        columns["error_type"] = pa.array([k for k, _ in kinds], type=pa.string())
        columns["error"] = pa.array([m for _, m in kinds], type=pa.string())
        table = pa.table(columns)
        if self.format == "csv":
            table = self._flat(table)
        return self._conform(table)

    def _column(self, values: list[Any], ok: np.ndarray) -> Any:
        """An Arrow column: arrays of one shape become (nested) fixed-size lists."""
        pa = self.pa
        good = [v for v, g in zip(values, ok, strict=True) if g]
        stacked = _arrays(good)
        if stacked is not None:
            shape = stacked.shape[1:]
            full = np.zeros((len(values), *shape), dtype=stacked.dtype)
            full[ok] = stacked
            column = pa.array(full.reshape(-1))
            for size in reversed(shape):
                column = pa.FixedSizeListArray.from_arrays(column, size)
            if shape:
                return _masked(pa, column, ok)
            return pa.array(full, mask=~ok)
        plain = [
            msgspec.to_builtins(v, enc_hook=_builtin) if v is not None else None for v in values
        ]
        try:
            return pa.array(plain)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            return pa.array(
                [_json.encode(v).decode() if v is not None else None for v in plain],
                type=pa.string(),
            )

    def _flat(self, table: Any) -> Any:
        """CSV holds no lists or structs: such columns are written as JSON text."""
        pa = self.pa
        for position, field in enumerate(table.schema):
            if pa.types.is_nested(field.type):
                texts = [
                    _json.encode(v).decode() if v is not None else None
                    for v in table.column(position).to_pylist()
                ]
                table = table.set_column(position, field.name, pa.array(texts, type=pa.string()))
        return table

    def _conform(self, table: Any) -> Any:
        """``table`` with the columns and types of the parts before it, where it can."""
        schema = self.schema
        if schema is None or table.schema.equals(schema):
            if schema is None and table.num_columns > 3 + (self.id_column is not None):
                self.schema = table.schema
            return table
        pa = self.pa
        columns = []
        for field in schema:
            if field.name in table.column_names:
                column = table.column(field.name)
                if not column.type.equals(field.type):
                    try:
                        column = column.cast(field.type)
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                        return table
                columns.append(column)
            else:
                columns.append(pa.nulls(table.num_rows, field.type))
        extra = [name for name in table.column_names if name not in schema.names]
        if extra:
            return table
        return pa.table(columns, schema=schema)

    def _write_table(self, path: Path, table: Any) -> None:
        if self.format == "parquet":
            parquet = require("pyarrow.parquet", feature="writing Parquet")
            _commit(path, lambda file: parquet.write_table(table, file))
        else:
            csv = require("pyarrow.csv", feature="writing CSV")
            _commit(path, lambda file: csv.write_csv(table, file))

    # -- resuming ---------------------------------------------------------------

    def remember(self, number: int) -> None:
        """Keep the columns of a part an earlier run wrote (a resumed run's parts match it)."""
        if self.format != "parquet" or self.schema is not None:
            return
        parquet = require("pyarrow.parquet", feature="reading Parquet")
        try:
            schema = parquet.read_schema(self.path(number))
        except (OSError, self.pa.ArrowInvalid):
            return
        if len(schema) > 3 + (self.id_column is not None):
            self.schema = schema

    def replace(self, number: int, rows: Rows, ordered: bool) -> list[tuple[int, Any, MdsError]]:
        """Rewrite part ``number`` with ``rows`` in place of the rows of the same index."""
        path = self.path(number)
        fresh = self.path(number).with_suffix(".new")
        failed = self.write_to(fresh, rows)
        try:
            if self.format == "jsonl":
                merged = _merge_lines(path.read_bytes(), fresh.read_bytes(), ordered)
                _commit(path, lambda file: file.write(merged))
            else:
                old, new = self._read(path), self._read(fresh)
                self._write_table(path, _merge_tables(self.pa, old, new, ordered))
        finally:
            fresh.unlink(missing_ok=True)
        return failed

    def write_to(self, path: Path, rows: Rows) -> list[tuple[int, Any, MdsError]]:
        values, failed = self._values(rows)
        if self.format == "jsonl":
            data = self._jsonl(rows, values, failed)
            _commit(path, lambda file: file.write(data))
        else:
            self._write_table(path, self._table(rows, values, failed))
        return [(rows.indices[i], self._id(rows, i), error) for i, error in failed.items()]

    def _read(self, path: Path) -> Any:
        if self.format == "parquet":
            return require("pyarrow.parquet", feature="reading Parquet").read_table(path)
        csv = require("pyarrow.csv", feature="reading CSV")
        return csv.read_csv(path)


def _masked(pa: Any, column: Any, ok: np.ndarray) -> Any:
    """``column`` (nested fixed-size lists) with the failed rows null at the top level."""
    return pa.FixedSizeListArray.from_arrays(column.values, type=column.type, mask=pa.array(~ok))


def _arrays(values: Sequence[Any]) -> np.ndarray | None:
    """``values`` stacked, if they are numeric arrays (or tensors) of one shape; else ``None``."""
    if not values:
        return None
    first = values[0]
    if hasattr(first, "detach") and hasattr(first, "numpy"):  # torch tensors: one stack
        if not all(type(v) is type(first) and v.shape == first.shape for v in values):
            return None
        torch = require("torch", feature="writing torch tensors")
        try:
            stacked = torch.stack(list(values)).detach().cpu()
        except RuntimeError:  # on several devices
            stacked = torch.stack([v.detach().cpu() for v in values])
        if stacked.dtype == torch.bfloat16:
            stacked = stacked.float()
        return _numeric(np.asarray(stacked.numpy()))
    kinds = (np.ndarray, np.generic)
    if not all(isinstance(v, kinds) for v in values):
        return None
    shape, dtype = np.shape(first), first.dtype
    if any(v.shape != shape or v.dtype != dtype for v in values):
        return None
    return _numeric(np.stack(values))


def _numeric(array: np.ndarray) -> np.ndarray | None:
    return array if array.dtype.kind in "biuf" else None


def _free(name: str, taken: Mapping[str, Any]) -> str:
    """``name``, or with underscores after it where the row's own columns hold it."""
    while name in taken or name in ("error", "error_type"):
        name += "_"
    return name


def _commit(path: Path, write: Any) -> None:
    """Write through ``write(file)`` to a temporary file, flush it to disk, then rename it."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class _Index(msgspec.Struct):
    index: int


def _merge_lines(old: bytes, new: bytes, ordered: bool) -> bytes:
    decode = msgspec.json.Decoder(_Index).decode
    fresh = {decode(line).index: line for line in new.splitlines() if line}
    kept = [line for line in old.splitlines() if line and decode(line).index not in fresh]
    if ordered:
        merged = sorted([*kept, *fresh.values()], key=lambda line: decode(line).index)
    else:
        merged = [*kept, *fresh.values()]
    return b"\n".join(merged) + b"\n"


def _merge_tables(pa: Any, old: Any, new: Any, ordered: bool) -> Any:
    retried = pa.array(new.column("index"))
    keep = pa.compute.invert(pa.compute.is_in(old.column("index"), value_set=retried))
    merged = pa.concat_tables([old.filter(keep), new], promote_options="permissive")
    if ordered:
        merged = merged.sort_by("index")
    return merged
