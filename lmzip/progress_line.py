"""A one-line progress display on stderr, redrawn in place: what is done, and an ETA.

The CLI shows it only to a person at a terminal (not under -q, not when stderr
is a file or a pipe), and erases it when the file is done.
"""

from __future__ import annotations

import shutil
import time
from typing import TextIO

REDRAW_SECONDS = 0.2  # fits take seconds per segment; redrawing more often only costs


def clock_text(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02}:{rest % 60:02}" if hours else f"{rest // 60}:{rest % 60:02}"


def describe(label: str, p, elapsed: float, unit: str) -> str:
    """The line for a lmzip.Progress: `unit` says what p.done and p.total count
    ("bytes" while encoding, "segments" while decoding)."""
    lm = getattr(p, "lm", 0)  # lm-coded segments (--method lm), where Progress has them
    kinds = f"{lm} lm, {p.zstd} zstd" if lm else f"{p.memory} memory, {p.zstd} zstd"
    if unit == "bytes":
        percent = 100 * p.done // p.total if p.total else 100
        parts = [f"{label}: {percent}% of {p.total:,} bytes", f"{p.memory + lm + p.zstd} segments ({kinds})"]
    else:
        parts = [f"{label}: segment {p.done}/{p.total} ({kinds})"]
    tokens = getattr(p, "tokens", None)  # tokens fitted (or coded) so far, where Progress has them
    if unit == "bytes" and tokens is not None:
        parts.append(f"{tokens:,} tokens {'coded' if lm else 'fitted'}")
    if p.total and p.done >= p.total:
        parts.append(f"done in {clock_text(elapsed)}")
    elif p.done and elapsed > 0:
        parts.append(f"ETA {clock_text(elapsed * (p.total - p.done) / p.done)}")
    else:
        parts.append("ETA -:--")
    return ", ".join(parts)


class ProgressLine:
    """A lmzip progress callback that redraws one line of `stream`; close() erases it."""

    def __init__(self, label: str, stream: TextIO, unit: str, clock=time.monotonic):
        self.label, self.stream, self.unit, self.clock = label, stream, unit, clock
        self.started: float | None = None
        self.drawn_at: float | None = None

    def __call__(self, p) -> None:
        now = self.clock()
        if self.started is None:
            self.started = now
        finished = p.total and p.done >= p.total
        if self.drawn_at is not None and now - self.drawn_at < REDRAW_SECONDS and not finished:
            return
        self.drawn_at = now
        width = shutil.get_terminal_size().columns - 1  # a line that wraps cannot be redrawn
        line = describe(self.label, p, now - self.started, self.unit)[:width]
        self.stream.write(f"\r{line}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.drawn_at is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
