"""What orbax and tensorstore print when a checkpoint read or write fails, reduced to the one
line `Checkpointer` reports itself.

Why there is noise at all: orbax runs a restore or a save as many concurrent tensorstore
operations gathered on a fresh asyncio loop, and closes the loop as soon as the first one
fails. The others still complete later, on tensorstore's threads, and their completion
callbacks (`loop.call_soon_threadsafe`) find the loop closed: tensorstore reports each as an
"unraisable" `RuntimeError: Event loop is closed` traceback (111-196 of them for one corrupt
checkpoint); the abandoned coroutines, finalized later, report their own errors the same way
("Exception ignored in: <coroutine ...>"), and asyncio logs the gathered future's "exception
was never retrieved". A failed asynchronous save also logs the same error once per orbax
thread, with a traceback each.

Nothing in those reports is lost information: the failing operation's error reaches
`Checkpointer`, which turns it into one warning (an unreadable checkpoint, then skipped) or one
`CheckpointError` line (a failed save). Checksums (lm/training/checksums.py) keep orbax from
reading a damaged checkpoint at all; this module handles the rest (checkpoints written before
checksums existed, a disk that fills during a save). Each filter matches only these reports:
orbax's own error records, and errors raised by tensorstore or passing through orbax.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback

_installed = False
suppressed: list[str] = []  # first lines of the orbax error records dropped, for one summary


# How tensorstore's errors reach Python: a ValueError whose message starts with the status code.
_STATUS = re.compile(
    r"^(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
    r"PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|"
    r"UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED): "
)


def _from_checkpoint_io(tb) -> bool:
    """Whether a traceback passes through orbax or tensorstore code."""
    files = [frame.f_code.co_filename.replace("\\", "/") for frame, _ in traceback.walk_tb(tb)]
    return any("/orbax/" in f or "/tensorstore/" in f for f in files)


def _checkpoint_io_error(exc: BaseException | None) -> bool:
    """An error raised by orbax or tensorstore (whose futures have no Python frames)."""
    if exc is None:
        return False
    tensorstore = isinstance(exc, ValueError) and bool(_STATUS.match(str(exc)))
    return tensorstore or _from_checkpoint_io(exc.__traceback__)


def _abandoned_operation(unraisable) -> bool:
    """A report of an operation orbax abandoned when its event loop closed: a completion
    callback that found the loop closed, or an orbax coroutine finalized with its error."""
    exc, tb = unraisable.exc_value, unraisable.exc_traceback
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return "call_soon_threadsafe" in [f.f_code.co_name for f, _ in traceback.walk_tb(tb)]
    return _from_checkpoint_io(tb) or _checkpoint_io_error(exc)


class _OrbaxErrors(logging.Filter):
    """Drops orbax's per-thread ERROR records (with tracebacks) of a failed operation; the
    failure itself propagates to Checkpointer, which reports it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or "/orbax/" not in record.pathname.replace("\\", "/"):
            return True
        if len(suppressed) < 100:
            suppressed.append(record.getMessage().splitlines()[0][:300] if record.msg else "")
        return False


class _NeverRetrieved(logging.Filter):
    """Drops asyncio's "exception was never retrieved" for a gathered orbax/tensorstore
    operation abandoned when its loop closed (its error was already raised once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "exception was never retrieved" not in str(record.msg):
            return True
        return not _checkpoint_io_error(record.exc_info[1] if record.exc_info else None)


def take_suppressed() -> list[str]:
    """The orbax error lines dropped since the last call (then forgotten)."""
    taken = list(suppressed)
    suppressed.clear()
    return taken


def install() -> None:
    """Installs the filters once per process (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _abandoned_operation(unraisable):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("absl").addFilter(_OrbaxErrors())
    logging.getLogger("asyncio").addFilter(_NeverRetrieved())
