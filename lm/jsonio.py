"""JSON parsing with a bounded nesting depth and one-line errors.

Why: `json.loads` recurses once per nesting level, so one hostile line of 100,000 `[` raises
`RecursionError` — not a `ValueError` — and kills a reader that counts bad lines as rejects.
Every reader of user JSON (JSONL documents, fine-tuning records, manifests) parses through
`loads`, which refuses input nested deeper than `MAX_DEPTH` before parsing it and turns every
parse failure into a `JSONError` whose message is one whole line (message, line and column).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from lm import storage

MAX_DEPTH = 64

# Brackets, quotes and backslashes: enough to track depth outside strings.
_TOKENS = re.compile(r'[\[\]{}"\\]')


class JSONError(ValueError):
    """Malformed or too deeply nested JSON; `str(e)` is one line."""


def nesting_depth(text: str, limit: int = MAX_DEPTH) -> int:
    """The deepest bracket nesting outside strings; stops counting once it passes `limit`."""
    depth = deepest = 0
    in_string = False
    skip_until = -1  # the index of a character escaped by a backslash inside a string
    for m in _TOKENS.finditer(text):
        pos, ch = m.start(), m.group()
        if pos <= skip_until:
            continue
        if in_string:
            if ch == "\\":
                skip_until = pos + 1
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads` that raises `JSONError` (one line) for malformed input, invalid UTF-8, or
    nesting deeper than `max_depth`."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONError(f"invalid UTF-8 at byte {e.start}") from None
    if nesting_depth(text, max_depth) > max_depth:
        raise JSONError(f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        msg = e.msg.removesuffix(" at")  # "Invalid control character at" reads badly alone
        raise JSONError(f"malformed JSON: {msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise JSONError(f"JSON nested deeper than {max_depth} levels") from None


def read_json(path: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """A whole JSON file (local or `gs://`, through `lm.storage`); `JSONError` names the file."""
    try:
        return loads(storage.read_bytes(path), max_depth=max_depth)
    except JSONError as e:
        raise JSONError(f"{path}: {e}") from None


def jsonl_objects(text: str, name: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of JSONL `text`; a BOM at the start of a
    line is not content. `JSONError` naming `name:line` for a bad line or one that is not an
    object (for readers where one bad line is the user's to fix, not a counted reject)."""
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip().removeprefix("\ufeff")
        if not line:
            continue
        try:
            record = loads(line)
        except JSONError as e:
            raise JSONError(f"{name}:{lineno}: {e}") from None
        if not isinstance(record, dict):
            raise JSONError(f"{name}:{lineno}: expected a JSON object per line")
        yield lineno, record
