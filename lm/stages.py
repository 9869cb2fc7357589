"""Named stages of a command, shown while they run and timed for the run's report.

Why: a fresh `lm train` used to print nothing for a minute (tokenizer training, packing,
compile) and look hung. `with stage("packing the data"):` draws a live line on stderr when stderr
is a terminal (`packing the data 12s`, with `done/total` when the stage reports counts) and
ends it with the stage's time; when stderr is not a terminal it prints nothing (logs and CI stay
clean). Every stage's time is recorded, so `report.md` can name each start-up phase.

One process-wide `LiveLine` owns the open carriage-return line: the training progress line uses
it too, and `break_line_before_logs()` makes every log record end that line first, so a warning
never lands glued onto the progress text.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

_TIMINGS: list[tuple[str, float]] = []
_STARTED = time.time()


def format_seconds(seconds: float) -> str:
    """`4.2s`, `1m05s`, `2h03m`: short and readable at every scale."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class LiveLine:
    """The one carriage-return line a process may have open on a terminal stream."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._open: TextIO | None = None  # the stream whose line is open

    def show(self, text: str, stream: TextIO) -> None:
        """Overwrites the open line with `text` (a terminal) or prints it as a line (else)."""
        with self._lock:
            if not _is_tty(stream):
                stream.write(text + "\n")
            else:
                if self._open is not None and self._open is not stream:
                    self.end()
                stream.write("\r\x1b[2K" + text)
                self._open = stream
            stream.flush()

    def clear(self) -> None:
        """Erases the open line (nothing is left of it on screen)."""
        with self._lock:
            if self._open is not None:
                self._open.write("\r\x1b[2K")
                self._open.flush()
                self._open = None

    def end(self) -> None:
        """Ends the open line with a newline, so what follows starts on a line of its own."""
        with self._lock:
            if self._open is not None:
                self._open.write("\n")
                self._open.flush()
                self._open = None


LIVE = LiveLine()


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _EndLiveLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        LIVE.end()
        return True


def break_line_before_logs() -> None:
    """Every handler of the root logger ends an open live line before it writes a record."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _EndLiveLine) for f in handler.filters):
            handler.addFilter(_EndLiveLine())


class Stage:
    """A running stage; `update(done, total)` adds counts to its live line."""

    def __init__(self, name: str, total: int | None, stream: TextIO) -> None:
        self.name, self.total, self.stream = name, total, stream
        self.done: int | None = None
        self.start = time.monotonic()

    def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total

    def text(self) -> str:
        counts = ""
        if self.done is not None:
            counts = f" {self.done}/{self.total}" if self.total else f" {self.done}"
        return f"{self.name}{counts} {format_seconds(time.monotonic() - self.start)}"


@contextmanager
def stage(
    name: str, *, total: int | None = None, stream: TextIO | None = None, after: float = 2.0
) -> Iterator[Stage]:
    """Times `name`; on a terminal, after `after` seconds, shows a live line until it ends.

    The stage's time is recorded (`timings()`) whether it succeeds or fails."""
    stream = stream or sys.stderr
    current = Stage(name, total, stream)
    stop = threading.Event()
    shown = threading.Event()

    def tick() -> None:
        if stop.wait(after):
            return
        while not stop.is_set():
            LIVE.show(current.text(), stream)
            shown.set()
            stop.wait(0.5)

    ticker = None
    if _is_tty(stream):
        ticker = threading.Thread(target=tick, name=f"stage:{name}", daemon=True)
        ticker.start()
    try:
        yield current
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        elapsed = time.monotonic() - current.start
        _TIMINGS.append((name, elapsed))
        if shown.is_set():
            LIVE.show(f"{name}: {format_seconds(elapsed)}", stream)
            LIVE.end()


def record(name: str, seconds: float) -> None:
    """Records a phase timed elsewhere (a child process, a compile measured by its caller)."""
    _TIMINGS.append((name, seconds))


def timings() -> list[tuple[str, float]]:
    """(name, seconds) of every stage this process ran so far, in order."""
    return list(_TIMINGS)


def since_start() -> float:
    """Seconds since this process imported `lm.stages` (the start of the command, near enough)."""
    return time.time() - _STARTED
