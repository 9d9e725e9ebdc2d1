"""A batch job's progress: a line redrawn in place on a terminal, periodic lines elsewhere."""

from __future__ import annotations

import sys
from typing import TextIO

import msgspec

__all__ = ["Display", "Progress"]


class Progress(msgspec.Struct, frozen=True, kw_only=True):
    """Where a running batch job is; given to a ``progress`` callback.

    Attributes:
        done: rows served successfully by this run.
        failed: rows that failed in this run.
        skipped: rows of parts an earlier run committed.
        total: the input's rows, where known before reading it all.
        seconds: time since the run began.
        rows_per_second: rows served (done or failed) per second.
        eta: seconds left at this rate, where the total is known.

    Added in 0.3.
    """

    done: int
    failed: int
    skipped: int
    total: int | None
    seconds: float
    rows_per_second: float
    eta: float | None


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Display:
    """Progress on ``stream``: redrawn in place on a terminal, else a line every ``every`` s."""

    def __init__(self, label: str, stream: TextIO | None = None, every: float = 10.0) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.every = 0.2 if self.tty else every
        self._shown = -1.0

    def due(self, seconds: float) -> bool:
        return self._shown < 0 or seconds - self._shown >= self.every

    def show(self, progress: Progress, *, final: bool = False) -> None:
        self._shown = progress.seconds
        line = self.line(progress)
        if self.tty:
            self.stream.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def line(self, progress: Progress) -> str:
        served = progress.done + progress.failed
        seen = served + progress.skipped
        head = [self.label + ":"]
        if progress.total:
            share = min(seen / progress.total, 1.0)
            if self.tty:
                filled = int(share * 24)
                head.append("[" + "#" * filled + "." * (24 - filled) + "]")
            head.append(f"{seen:,}/{progress.total:,} rows ({share:.0%})")
        else:
            head.append(f"{seen:,} rows")
        rest = [f"{progress.rows_per_second:,.0f} rows/s"]
        if progress.eta is not None:
            rest.append(f"ETA {_clock(progress.eta)}")
        rest.append(f"elapsed {_clock(progress.seconds)}")
        rest.append(f"{progress.failed:,} errors")
        if progress.skipped:
            rest.append(f"{progress.skipped:,} skipped")
        return " | ".join([" ".join(head), *rest])
