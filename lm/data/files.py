"""Finding and reading the files of a document source: include/exclude globs, comma-separated
paths, UTF-8 decoding that names the file and byte offset, and skip counts (files that are too
big, not UTF-8, unreadable or not regular files — a FIFO would block a reader forever)."""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
from dataclasses import dataclass, field

from lm import storage
from lm.errors import DataError

# Files already named in a warning: the tokenizer and every packed split read the same files,
# and one warning per file is enough.
_WARNED: set[str] = set()


@dataclass
class SkipStats:
    """Counts of files skipped while reading (non-UTF-8, over max_file_bytes, unreadable or not
    a regular file), and "path at byte N" for the first few that are not UTF-8."""

    not_utf8: int = 0
    too_big: int = 0
    unreadable: int = 0
    not_utf8_examples: list[str] = field(default_factory=list)


def globs(text: str) -> list[str]:
    return [g.strip() for g in text.split(",") if g.strip()]


def _matches(rel: str, patterns: list[str]) -> bool:
    base = os.path.basename(rel)
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(base, p) for p in patterns)


def missing_path(path: str) -> DataError:
    return DataError(f"data path {path!r} does not exist (set by --config.data.path)")


def decode_utf8(raw: bytes, name: str) -> str:
    """`raw` as UTF-8 text, or a DataError naming `name` and the byte offset of the first
    invalid byte. Never a guessed encoding: text decoded as cp1252 by mistake would be trained
    on as mojibake; `lm data run` detects legacy encodings and reports what it converted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{name}: not valid UTF-8 at byte {e.start} (0x{raw[e.start]:02x}); convert it to "
            "UTF-8 first (e.g. iconv, or `lm data run`, which detects legacy encodings)"
        ) from None


def read_file(path: str, max_bytes: int, stats: SkipStats) -> str | None:
    """The file's text, or None (counted in `stats`) if it is too big, not UTF-8, unreadable or
    not a regular file (a FIFO would block the read forever)."""
    try:
        if not storage.is_regular_file(path):
            stats.unreadable += 1
            return None
        if max_bytes and os.path.getsize(path) > max_bytes:
            stats.too_big += 1
            return None
        with open(path, "rb") as f:
            raw = f.read()
        return decode_utf8(raw, path)
    except DataError as e:
        stats.not_utf8 += 1
        if len(stats.not_utf8_examples) < 3:
            stats.not_utf8_examples.append(str(e).split(";")[0].replace(": not valid UTF-8", ""))
        warn_once(path, f"data: skipped {e}".split(";")[0])
        return None
    except OSError:
        stats.unreadable += 1
        return None


def warn_once(path: str, message: str) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        logging.warning("%s", message)


def walk(root: str, include: list[str], exclude: list[str], skip_dir) -> list[str]:
    """Sorted relative paths under `root` matching include and not exclude."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = sorted(
            d for d in dirnames if not skip_dir(os.path.join(rel_dir, d).replace(os.sep, "/"))
        )
        for name in filenames:
            rel = os.path.join(rel_dir, name).replace(os.sep, "/")
            if include and not _matches(rel, include):
                continue
            if exclude and _matches(rel, exclude):
                continue
            rels.append(rel)
    return sorted(rels)


def expand_paths(spec: str) -> list[str]:
    """Comma-separated files or globs -> sorted existing files; a missing one is an error, and
    so is one that is not a regular file (a FIFO or device would block the reader)."""
    out = []
    for item in globs(spec):
        if any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise missing_path(item)
            out.extend(found)
        elif os.path.isdir(item):
            raise DataError(f"{item!r} is a directory: use --config.data.source=dir")
        elif os.path.lexists(item):
            out.append(item)
        else:
            raise missing_path(item)
    for path in out:
        storage.require_regular_file(path)
    return out
