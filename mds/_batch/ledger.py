"""What a batch job has committed, so that a run killed at any point can resume.

The output folder holds, beside the parts:

- ``_mds_job.json``, the manifest: what made the output (the servable, its
  version and config, the input's kind, the chunking, the output format).
  A run that resumes must match it, or it refuses rather than mix outputs.
- ``_mds_ledger.jsonl``: a line per committed part, appended after the part
  was renamed into place: its rows, how many failed, the checksum of its
  input rows. A part without its line is not committed (it is redone).
- ``_errors.jsonl``: a line per failed row (index, id, error type, message).
  Lines of a part that was not committed are dropped when a run resumes.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from .._errors import ConfigError
from .parts import part_name
from .sources import FORMATS

__all__ = ["ERRORS", "LEDGER", "MANIFEST", "SUCCESS", "Entry", "ErrorLine", "Ledger"]

MANIFEST = "_mds_job.json"
LEDGER = "_mds_ledger.jsonl"
ERRORS = "_errors.jsonl"
#: Written when every row of the input has its output row (as Spark and Hadoop do).
SUCCESS = "_SUCCESS"
#: Manifest fields that may differ between runs of one job.
_FREE = {"created", "input.path"}


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One committed part."""

    part: int
    attempt: int
    start: int
    rows: int
    failed: int
    crc: int
    file: str


class ErrorLine(msgspec.Struct, frozen=True, kw_only=True):
    """One failed row, as ``_errors.jsonl`` holds it."""

    index: int
    id: Any = None
    type: str
    message: str
    part: int
    attempt: int


_entry = msgspec.json.Decoder(Entry)
_error_line = msgspec.json.Decoder(ErrorLine)
_encode = msgspec.json.Encoder().encode


class Ledger:
    """The committed parts of the job whose output is in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.entries: dict[int, Entry] = {}
        self.resumed = False

    @classmethod
    def open(
        cls, folder: Path, manifest: dict[str, Any], *, resume: bool, overwrite: bool
    ) -> Ledger:
        """The ledger of ``folder``, checked against ``manifest``; a fresh one where none is.

        Raises:
            ConfigError: the folder holds another job's output (or another
                run's, without ``resume`` or ``overwrite``), or is not a folder.
        """
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"the output {str(folder)!r} is a file; give a folder")
        folder.mkdir(parents=True, exist_ok=True)
        ledger = cls(folder)
        found = folder / MANIFEST
        parts = _parts(folder)
        if overwrite:
            ledger._clear()
        elif found.exists():
            if not resume:
                raise ConfigError(
                    f"the output folder {str(folder)!r} already holds a job's output; "
                    "resume it (resume=True, --resume) or start over (overwrite=True, --overwrite)"
                )
            _check_same(_read_manifest(found), manifest, folder)
            ledger.resumed = True
        elif parts:
            raise ConfigError(
                f"the output folder {str(folder)!r} holds part files ({parts[0].name}, ...) but "
                f"no {MANIFEST}; give an empty folder, or overwrite=True (--overwrite)"
            )
        if not ledger.resumed:
            _write_atomic(found, msgspec.json.format(_encode(manifest)) + b"\n")
        (folder / SUCCESS).unlink(missing_ok=True)  # until this run completes
        ledger._load()
        return ledger

    def _clear(self) -> None:
        for path in [*_parts(self.folder), *self.folder.glob("*.tmp")]:
            path.unlink()
        for name in (MANIFEST, LEDGER, ERRORS, SUCCESS):
            (self.folder / name).unlink(missing_ok=True)

    def _load(self) -> None:
        path = self.folder / LEDGER
        if path.exists():
            for line in path.read_bytes().splitlines():
                try:
                    entry = _entry.decode(line)
                except msgspec.DecodeError:
                    continue  # the last line, torn by a kill as it was written
                self.entries[entry.part] = entry
        for leftover in self.folder.glob("*.tmp"):
            leftover.unlink()
        # Error lines of parts that were never committed go; the parts are redone.
        self._rewrite_errors(self.errors())

    def errors(self) -> list[ErrorLine]:
        """The failed rows of the committed parts (their latest attempts)."""
        path = self.folder / ERRORS
        if not path.exists():
            return []
        kept: list[ErrorLine] = []
        for line in path.read_bytes().splitlines():
            try:
                error = _error_line.decode(line)
            except msgspec.DecodeError:
                continue
            entry = self.entries.get(error.part)
            if entry is not None and entry.attempt == error.attempt:
                kept.append(error)
        return kept

    def _rewrite_errors(self, errors: Iterable[ErrorLine]) -> None:
        data = b"".join(_encode(error) + b"\n" for error in errors)
        _write_atomic(self.folder / ERRORS, data)

    def commit(
        self,
        number: int,
        start: int,
        rows: int,
        crc: int,
        format: str,
        failed: list[tuple[int, Any, str, str]],
    ) -> Entry:
        """Record part ``number`` (already in place) and its failed rows; durable on return."""
        previous = self.entries.get(number)
        attempt = previous.attempt + 1 if previous is not None else 1
        if failed:
            lines = []
            for index, row_id, kind, message in failed:
                line = ErrorLine(
                    index=index, id=row_id, type=kind, message=message, part=number, attempt=attempt
                )
                lines.append(_encode(line) + b"\n")
            _append(self.folder / ERRORS, b"".join(lines))
        entry = Entry(
            part=number,
            attempt=attempt,
            start=start,
            rows=rows,
            failed=len(failed),
            crc=crc,
            file=part_name(number, format),
        )
        _append(self.folder / LEDGER, _encode(entry) + b"\n")
        self.entries[number] = entry
        return entry

    def recommit(
        self, number: int, failed: list[tuple[int, Any, str, str]], retried: set[int]
    ) -> Entry:
        """Record part ``number`` again after its rows ``retried`` were served once more."""
        entry = self.entries[number]
        still = [e for e in self.errors() if e.part == number and e.index not in retried]
        carried = [(e.index, e.id, e.type, e.message) for e in still]
        fmt = entry.file.rpartition(".")[2]
        return self.commit(number, entry.start, entry.rows, entry.crc, fmt, [*carried, *failed])

    def failed_rows(self) -> dict[int, set[int]]:
        """The indices of the failed rows of each committed part that has any."""
        found: dict[int, set[int]] = {}
        for error in self.errors():
            found.setdefault(error.part, set()).add(error.index)
        return found

    def finish(self) -> None:
        """Leave ``_errors.jsonl`` holding only committed parts' rows, by index; mark success."""
        self._rewrite_errors(sorted(self.errors(), key=lambda error: error.index))
        _write_atomic(self.folder / SUCCESS, b"")


def _parts(folder: Path) -> list[Path]:
    return sorted(p for fmt in FORMATS for p in folder.glob(f"part-*.{fmt}"))


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        found = msgspec.json.decode(path.read_bytes())
    except (OSError, msgspec.DecodeError) as exc:
        raise ConfigError(f"cannot read the job's manifest {str(path)!r}: {exc}") from None
    if not isinstance(found, dict):
        raise ConfigError(f"the job's manifest {str(path)!r} is not a JSON object")
    return found


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _check_same(then: dict[str, Any], now: dict[str, Any], folder: Path) -> None:
    """Refuse to resume when what made the output differs from what would make it now."""
    before, after = _flat(then), _flat(msgspec.json.decode(_encode(now)))
    changed = [
        f"{key}: {before.get(key)!r} then, {after.get(key)!r} now"
        for key in sorted(set(before) | set(after))
        if key not in _FREE and before.get(key) != after.get(key)
    ]
    if changed:
        shown = "; ".join(changed[:5]) + ("; ..." if len(changed) > 5 else "")
        raise ConfigError(
            f"cannot resume the job in {str(folder)!r}: it was made differently ({shown}). "
            "Resuming would mix two jobs' outputs; use a new output folder, or overwrite=True"
        )


def _append(path: Path, data: bytes) -> None:
    with path.open("ab") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def now_text() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
