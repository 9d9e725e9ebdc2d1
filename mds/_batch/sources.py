"""A batch job's input, read in chunks: one chunk becomes one committed part.

A source turns its rows into the servable's requests as a transport does:
a JSON Lines line is a request as mds's JSON route takes it; a columnar row
(Parquet, CSV, a data frame) is a record (``{column: value}``) or, for a
model that declares its inputs, named tensors given to its
``from_tensors`` (as the Open Inference Protocol does). Reading blocks: the
job runs :meth:`Source.chunks` in a worker thread. Each chunk carries a
checksum of its rows, so that a resumed job can tell its input changed.
"""

from __future__ import annotations

import os
import pickle
import zlib
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Container,
    Iterable,
    Iterator,
    Sequence,
    Sized,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import msgspec
import numpy as np

from .._deps import require
from .._errors import ConfigError, DecodeError, InvalidInput, MdsError, describe
from .._named import input_check, request_from_tensors
from .._servable import Servable

__all__ = ["FORMATS", "Chunk", "Refused", "Rows", "Source", "format_of", "open_source"]

#: The file formats a job reads and writes.
FORMATS = ("jsonl", "csv", "parquet")
Rows = Literal["auto", "tensors", "records"]

_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class Refused(NamedTuple):
    """A row that makes no request (bad JSON, a null, tensors that do not fit): its error."""

    error: MdsError


@dataclass(eq=False, slots=True)
class Chunk:
    """Rows ``start`` to ``start + rows`` of the input: part ``number`` of the output.

    A chunk that a resumed run skips has no requests made (only its checksum).
    """

    number: int
    start: int
    rows: int
    requests: list[Any]  # the request, or Refused
    ids: list[Any] | None
    crc: int


def format_of(path: Path, given: str | None, what: str) -> str:
    """The format named, or the one ``path``'s suffix says."""
    if given is not None:
        if given not in FORMATS:
            raise ConfigError(f"{what} format {given!r} is not one of {', '.join(FORMATS)}")
        return given
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None and path.is_dir() and any(path.glob("*.parquet")):
        found = "parquet"
    if found is None:
        raise ConfigError(
            f"cannot tell the {what} format of {str(path)!r} from its name; "
            f"name it .jsonl, .csv or .parquet, or give the format ({', '.join(FORMATS)})"
        )
    return found


class Source:
    """Rows to serve, in chunks of a fixed number of rows."""

    #: What it is, for the job's manifest: ``jsonl``, ``csv``, ``parquet``, ``frame``, ``iterable``.
    kind: str = ""
    #: The rows it holds, where known before reading.
    total: int | None = None
    #: How its rows become requests: ``requests`` as they are, ``records``, ``tensors``.
    mode: str = "requests"
    path: str | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "rows_as": self.mode}

    def chunks(self, size: int, skip: Container[int] = ()) -> Iterator[Chunk]:
        """The chunks, in order (blocking); those numbered in ``skip`` without requests."""
        raise NotImplementedError

    def achunks(self, size: int) -> AsyncIterator[Chunk] | None:
        """The chunks, for a source that must be read in the caller's loop; else ``None``."""
        return None


def open_source(
    source: Any,
    target: Servable,
    *,
    format: str | None = None,
    rows: Rows = "auto",
    columns: Sequence[str] | None = None,
    id_column: str | None = None,
) -> Source:
    """The :class:`Source` for what a caller passed: a path, a frame, or requests."""
    if rows not in ("auto", "tensors", "records"):
        raise ConfigError(f"rows={rows!r}: expected 'auto', 'tensors' or 'records'")
    if isinstance(source, str | os.PathLike):
        path = Path(os.fspath(source))
        if not path.exists():
            raise ConfigError(f"the input {str(path)!r} does not exist")
        kind = format_of(path, format, "input")
        if kind == "jsonl":
            if path.is_dir():
                raise ConfigError(f"the input {str(path)!r} is a directory, not a JSON Lines file")
            return JsonLines(path, id_column)
        return ArrowFile(path, kind, target, rows, columns, id_column)
    if hasattr(source, "__arrow_c_stream__"):
        return ArrowFile(source, "frame", target, rows, columns, id_column)
    if isinstance(source, str | bytes | dict):
        raise ConfigError(
            f"the input is a {type(source).__name__}: give a path, a data frame, "
            "or an iterable of requests"
        )
    if isinstance(source, AsyncIterable):
        return Requests(source)
    if isinstance(source, Iterable):
        return Requests(source)
    raise ConfigError(
        f"cannot read rows from a {type(source).__name__}: give a path (.jsonl, .csv, "
        ".parquet), a data frame, or an iterable or async iterable of requests"
    )


# -- requests as they are ---------------------------------------------------------


class Requests(Source):
    """An iterable or async iterable of requests."""

    def __init__(self, items: Iterable[Any] | AsyncIterable[Any]) -> None:
        self.items = items
        self.kind = "iterable"
        self.total = len(items) if isinstance(items, Sized) else None

    def chunks(self, size: int, skip: Container[int] = ()) -> Iterator[Chunk]:
        assert isinstance(self.items, Iterable)
        chunker = _Chunker(size)
        for item in self.items:
            if (chunk := chunker.add(item)) is not None:
                yield chunk
        if (chunk := chunker.last()) is not None:
            yield chunk

    def achunks(self, size: int) -> AsyncIterator[Chunk] | None:
        items = self.items
        if not isinstance(items, AsyncIterable):
            return None

        async def read() -> AsyncIterator[Chunk]:
            chunker = _Chunker(size)
            async for item in items:
                if (chunk := chunker.add(item)) is not None:
                    yield chunk
            if (chunk := chunker.last()) is not None:
                yield chunk

        return read()


class _Chunker:
    """Requests, gathered into chunks of ``size``."""

    def __init__(self, size: int) -> None:
        self.size, self.number, self.start = size, 0, 0
        self.requests: list[Any] = []

    def add(self, request: Any) -> Chunk | None:
        """The chunk ``request`` completes, if it completes one."""
        self.requests.append(request)
        return self.last() if len(self.requests) == self.size else None

    def last(self) -> Chunk | None:
        """The chunk of the requests gathered so far; ``None`` if there are none."""
        requests = self.requests
        if not requests:
            return None
        chunk = Chunk(self.number, self.start, len(requests), requests, None, _crc_of(requests))
        self.number, self.start, self.requests = self.number + 1, self.start + len(requests), []
        return chunk


def _crc_of(requests: list[Any]) -> int:
    """A checksum of requests, to tell a resumed job's input from another."""
    crc = 0
    for request in requests:
        try:
            data = _packer.encode(request)
        except (TypeError, ValueError, OverflowError):
            try:
                data = pickle.dumps(request, protocol=5)
            except Exception:
                data = repr(request).encode()
        crc = zlib.crc32(data, crc)
    return crc


def _pack(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        array = np.asarray(value)
        return [array.dtype.str, list(array.shape), array.tobytes()]
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        return _pack(value.detach().cpu().numpy())
    raise TypeError(type(value).__name__)


_packer = msgspec.msgpack.Encoder(enc_hook=_pack)


# -- JSON Lines ------------------------------------------------------------------------


class JsonLines(Source):
    """A JSON Lines file: each line is one request, as mds's JSON route takes its body.

    With an ``id_column``, that key of each line's object is the row's id
    (and is left out of its request). Blank lines are not rows.
    """

    def __init__(self, path: Path, id_column: str | None) -> None:
        self.kind, self.path, self.file = "jsonl", str(path), path
        self.id_column = id_column
        self.total = _count_lines(path)

    def chunks(self, size: int, skip: Container[int] = ()) -> Iterator[Chunk]:
        decode = msgspec.json.Decoder().decode
        id_column = self.id_column
        lines: list[tuple[int, bytes]] = []
        start = number = crc = 0
        with self.file.open("rb") as data:
            for line_number, line in enumerate(data, 1):
                if line.isspace():
                    continue
                crc = zlib.crc32(line, crc)
                lines.append((line_number, line))
                if len(lines) == size:
                    yield self._chunk(number, start, lines, crc, number in skip, decode, id_column)
                    number, start, lines, crc = number + 1, start + size, [], 0
        if lines:
            yield self._chunk(number, start, lines, crc, number in skip, decode, id_column)

    @staticmethod
    def _chunk(
        number: int,
        start: int,
        lines: list[tuple[int, bytes]],
        crc: int,
        skipped: bool,
        decode: Any,
        id_column: str | None,
    ) -> Chunk:
        requests: list[Any] = []
        ids: list[Any] | None = [] if id_column is not None and not skipped else None
        for line_number, line in [] if skipped else lines:
            try:
                request: Any = decode(line)
            except msgspec.DecodeError as exc:
                request = Refused(DecodeError(f"line {line_number}: not valid JSON: {exc}"))
            except RecursionError:
                request = Refused(DecodeError(f"line {line_number}: JSON nested too deeply"))
            if ids is not None:
                ids.append(request.pop(id_column, None) if isinstance(request, dict) else None)
            requests.append(request)
        return Chunk(number, start, len(lines), requests, ids, crc)


def _count_lines(path: Path) -> int:
    """Rows of a JSON Lines file (its lines that are not blank), for progress."""
    with path.open("rb") as lines:
        return sum(1 for line in lines if not line.isspace())


# -- Arrow: Parquet, CSV, data frames ---------------------------------------------------


class ArrowFile(Source):
    """Columnar rows through Arrow: a Parquet file or directory, a CSV file, a data frame."""

    def __init__(
        self,
        source: Any,
        kind: str,
        target: Servable,
        rows: Rows,
        columns: Sequence[str] | None,
        id_column: str | None,
    ) -> None:
        pa = require("pyarrow", feature=f"reading {'a data frame' if kind == 'frame' else kind}")
        self.kind, self.source, self.target = kind, source, target
        self.path = str(source) if kind != "frame" else None
        schema = self._schema(pa)
        names = list(schema.names)
        for name in [*(columns or ()), *([id_column] if id_column else [])]:
            if name not in names:
                raise ConfigError(
                    f"the input has no column {name!r}; its columns are {', '.join(names)}"
                )
        self.id_column = id_column
        signature = target.signature()
        inputs = dict(signature[0]) if signature is not None else {}
        if rows == "auto":
            rows = "tensors" if inputs and all(name in names for name in inputs) else "records"
        if rows == "tensors":
            if not inputs:
                raise ConfigError(
                    f"rows='tensors': {target.name!r} declares no inputs (its handler's "
                    "signature); give records instead (rows='records')"
                )
            missing = [name for name in inputs if name not in names]
            if missing:
                raise ConfigError(
                    f"rows='tensors': the input has no column {missing[0]!r} for "
                    f"{target.name!r}'s input of that name; its columns are {', '.join(names)}"
                )
            assert signature is not None
            self.check = input_check(signature)
            self.names = list(inputs)
        else:
            self.names = list(columns) if columns else [n for n in names if n != id_column]
        self.mode = rows
        self.reading = [
            *self.names,
            *([id_column] if id_column and id_column not in self.names else []),
        ]

    def _schema(self, pa: Any) -> Any:
        if self.kind == "frame":
            self.total = len(self.source) if isinstance(self.source, Sized) else None
            if isinstance(self.source, pa.RecordBatchReader):  # read once: ask, do not open
                return self.source.schema
            return pa.RecordBatchReader.from_stream(self.source).schema
        path = Path(self.source)
        if self.kind == "csv":
            return self._csv(path, None).schema
        if path.is_dir():
            dataset = self._dataset(path)
            self.total = dataset.count_rows()
            return dataset.schema
        parquet = require("pyarrow.parquet", feature="reading Parquet")
        metadata = parquet.ParquetFile(path)
        self.total = metadata.metadata.num_rows
        return metadata.schema_arrow

    def _dataset(self, path: Path) -> Any:
        dataset = require("pyarrow.dataset", feature="reading Parquet")
        scan = dataset.ParquetFragmentScanOptions(pre_buffer=False)  # as for one file
        fmt = dataset.ParquetFileFormat(default_fragment_scan_options=scan)
        return dataset.dataset(sorted(str(p) for p in path.glob("*.parquet")), format=fmt)

    def _csv(self, path: Path, columns: list[str] | None) -> Any:
        csv = require("pyarrow.csv", feature="reading CSV")
        options = csv.ConvertOptions(include_columns=columns) if columns else None
        try:
            return csv.open_csv(path, convert_options=options)
        except Exception as exc:
            raise ConfigError(f"cannot read {str(path)!r} as CSV: {describe(exc)}") from exc

    def _batches(self, size: int) -> Iterator[Any]:
        pa = require("pyarrow", feature="reading Arrow data")
        if self.kind == "frame":
            reader = self.source
            if not isinstance(reader, pa.RecordBatchReader):
                reader = pa.RecordBatchReader.from_stream(reader)
            for batch in reader:
                yield batch.select(self.reading)
            return
        path = Path(self.source)
        if self.kind == "csv":
            yield from self._csv(path, self.reading)
        elif path.is_dir():
            yield from self._dataset(path).to_batches(
                columns=self.reading, batch_size=size, use_threads=False
            )
        else:
            parquet = require("pyarrow.parquet", feature="reading Parquet")
            # pre_buffer keeps every column chunk read so far: memory would
            # grow with the file.
            reader = parquet.ParquetFile(path, pre_buffer=False)
            yield from reader.iter_batches(batch_size=size, columns=self.reading)

    def chunks(self, size: int, skip: Container[int] = ()) -> Iterator[Chunk]:
        start = 0
        for number, batch in enumerate(_rechunk(self._batches(size), size)):
            crc = zlib.crc32(memoryview(batch.serialize()))
            if number in skip:
                yield Chunk(number, start, batch.num_rows, [], None, crc)
            else:
                ids = batch.column(self.id_column).to_pylist() if self.id_column else None
                tensors = self.mode == "tensors"
                requests = self._tensors(batch) if tensors else self._records(batch)
                yield Chunk(number, start, batch.num_rows, requests, ids, crc)
            start += batch.num_rows

    def _records(self, batch: Any) -> list[Any]:
        names = self.names
        values = [batch.column(name).to_pylist() for name in names]
        return [dict(zip(names, row, strict=True)) for row in zip(*values, strict=True)]

    def _tensors(self, batch: Any) -> list[Any]:
        count = batch.num_rows
        arrays: dict[str, Any] = {}
        refused: dict[int, Refused] = {}
        fits = True  # every column fits its input: rows need no check of their own
        for name in self.names:
            column = batch.column(name)
            if column.null_count:
                for index in np.flatnonzero(
                    column.is_null().to_numpy(zero_copy_only=False)
                ).tolist():
                    refused.setdefault(
                        int(index), Refused(InvalidInput(f"input {name!r} is null in this row"))
                    )
            arrays[name], fit = self.check.column(name, _numpy(column))
            fits = fits and fit
        check, target = self.check, self.target
        requests: list[Any] = []
        for index in range(count):
            if index in refused:
                requests.append(refused[index])
                continue
            try:
                tensors = {name: array[index] for name, array in arrays.items()}
                if not fits:
                    tensors = check(tensors)
                requests.append(request_from_tensors(target, tensors))
            except MdsError as exc:
                requests.append(Refused(exc))
        return requests


def _numpy(column: Any) -> np.ndarray:
    """A column's values as one array: a fixed-size list column gives one axis more per level."""
    pa = require("pyarrow", feature="reading Arrow data")
    shape: list[int] = []
    values = column
    while pa.types.is_fixed_size_list(values.type):
        size = values.type.list_size
        shape.append(size)
        values = values.values.slice(values.offset * size, len(values) * size)
    if shape:
        flat = values.to_numpy(zero_copy_only=False)
        return np.asarray(flat).reshape(len(column), *shape)
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        out = np.empty(len(column), dtype=object)
        for index, value in enumerate(column.to_numpy(zero_copy_only=False)):
            out[index] = np.asarray(value) if value is not None else None
        return out
    return np.asarray(column.to_numpy(zero_copy_only=False))


def _rechunk(batches: Iterable[Any], size: int) -> Iterator[Any]:
    """Record batches of exactly ``size`` rows (the last may be shorter), whatever came in."""
    pa = require("pyarrow", feature="reading Arrow data")
    pending: list[Any] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(size - count, batch.num_rows)
            pending.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == size:
                yield _joined(pa, pending)
                pending, count = [], 0
    if count:
        yield _joined(pa, pending)


def _joined(pa: Any, batches: list[Any]) -> Any:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
