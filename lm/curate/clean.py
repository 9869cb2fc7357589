"""Decoding and text cleanup: bytes -> valid, normalized Unicode text.

Decoding is strict: a file that is not valid UTF-8 (or looks binary) is rejected with a reason
rather than decoded with replacement characters, so nothing garbled enters training data silently.
The one exception is a whole document in a legacy encoding (cp1252, Shift-JIS...), which is
detected (charset-normalizer) and decoded; corrupt UTF-8 is never "repaired" that way.
Cleanup repairs mojibake (ftfy), NFC-normalizes, drops control characters, normalizes newlines
and odd spaces, and for web pages removes boilerplate lines (cookie banners, share buttons...).
Code keeps its indentation and inner spacing; prose gets runs of spaces collapsed.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import ftfy

# C0/C1 control characters except tab and newline, plus zero-width and BOM characters.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u2060\ufeff]")
_ODD_SPACE = re.compile(r"[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_TRAILING = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")
_INNER_SPACES = re.compile(r"(?<=\S)[ \t]{2,}")
_BOILERPLATE = re.compile(
    r"cookie|all rights reserved|skip to (?:main )?content|share (?:on|this)|follow us"
    r"|sign up for (?:our|the) newsletter|subscribe to (?:our|the) newsletter|log ?in|sign ?in"
    r"|click here|back to top|read more|powered by|terms of (?:use|service)|privacy policy"
    r"|javascript|enable cookies|accept all|copyright ©|©",
    re.IGNORECASE,
)
_FTFY_CONFIG = ftfy.TextFixerConfig(
    unescape_html=False,
    uncurl_quotes=False,
    fix_latin_ligatures=False,
    fix_character_width=False,
    normalization=None,
    explain=False,
)


def decode(raw: bytes, binary_probe: int = 8192) -> tuple[str | None, str | None]:
    """(text, None), or (None, reason) for binary, invalid UTF-8 or empty input."""
    text, reason, _ = decode_detail(raw, binary_probe)
    return text, reason


# Legacy (non-UTF-8) decoding is tried only where the bytes look like a whole document in one
# other encoding, not like UTF-8 with a few corrupt bytes: enough bytes for the detector to be
# reliable, fewer valid UTF-8 sequences than invalid ones, and the high bytes spread over the text
# (several runs between ASCII, or a large share). Corrupt UTF-8 stays an `invalid_utf8` reject.
_LEGACY_MIN_BYTES = 64
_LEGACY_MIN_RUNS = 3
_LEGACY_MIN_HIGH_FRAC = 0.3
_LEGACY_MAX_CHAOS = 0.1
_HIGH_RUN = re.compile(rb"[\x80-\xff]+")


def _legacy_decode(raw: bytes) -> tuple[str | None, str]:
    """(text, encoding) of a document in a legacy encoding, or (None, "") when unsure."""
    if len(raw) < _LEGACY_MIN_BYTES:
        return None, ""
    loose = raw.decode("utf-8", "replace")
    invalid = loose.count("\ufffd")
    if sum(ord(c) > 127 for c in loose) - invalid >= invalid:
        return None, ""  # mostly valid UTF-8: this is corrupt UTF-8, not another encoding
    runs = _HIGH_RUN.findall(raw)
    high = sum(len(r) for r in runs)
    if len(runs) < _LEGACY_MIN_RUNS and high < _LEGACY_MIN_HIGH_FRAC * len(raw):
        return None, ""
    try:
        from charset_normalizer import from_bytes
    except ImportError:  # not installed: the document stays an invalid_utf8 reject
        return None, ""
    matches = list(from_bytes(raw))
    best = min(matches, key=lambda m: m.chaos, default=None)
    if best is None or best.chaos > _LEGACY_MAX_CHAOS:
        return None, ""
    encoding = best.encoding
    # Western code pages tie on plain Latin text; cp1252 is by far the most used (and what
    # browsers read "latin-1" as), so it wins a tie.
    if any(m.encoding == "cp1252" and m.chaos <= best.chaos + 0.01 for m in matches):
        encoding = "cp1252"
    if encoding.startswith(("utf", "ascii")):
        return None, ""
    try:
        return raw.decode(encoding), encoding
    except (UnicodeDecodeError, LookupError):
        return None, ""


def decode_detail(raw: bytes, binary_probe: int = 8192) -> tuple[str | None, str | None, str]:
    """(text, None, encoding) or (None, reason, ""): UTF-8 first, then a detected legacy
    encoding (cp1252, Shift-JIS, ...) when the whole document is clearly in one."""
    if not raw or not raw.strip():
        return None, "empty", ""
    if b"\x00" in raw[:binary_probe]:
        return None, "binary", ""
    try:
        return raw.decode("utf-8-sig"), None, "utf-8"
    except UnicodeDecodeError:
        pass
    text, encoding = _legacy_decode(raw)
    if text is None:
        return None, "invalid_utf8", ""
    return text, None, encoding


def text_problem(text: str) -> str | None:
    """Why a decoded string (from JSON, Parquet, TFDS) cannot be a document, or None: a lone
    surrogate cannot be written as UTF-8, and a NUL means binary data in a text field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "lone_surrogate"
    if "\x00" in text:
        return "binary"
    return None


def field_string(value: Any, name: str, allow_int: bool = False) -> tuple[str, str | None]:
    """(string value, None) of an optional id/url field of a record (JSON, Parquet), or
    ("", reject reason) for a wrong type or an unwritable string."""
    if value is None or value == "":
        return "", None
    if isinstance(value, int) and allow_int and not isinstance(value, bool):
        return str(value), None
    if not isinstance(value, str):
        return "", f"invalid_field_type:{name}"
    return value, text_problem(value)


def printable_name(name: str) -> str:
    """A file name that is not valid UTF-8 (os.walk hands it over with surrogate escapes) as a
    writable string: the bad bytes become `\\xNN`."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "surrogateescape")
        return raw.decode("utf-8", "backslashreplace")


def escaped_name(name: str) -> str:
    """A file name as it appears in ids: the bad bytes of a name that is not valid UTF-8 become
    `\\xNN` (as `printable_name`), and a backslash in the name is doubled, so two different
    names never look alike (a file literally named `a\\xffb` next to one with the byte 0xff)."""
    raw = name.encode("utf-8", "surrogateescape").replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace")


def remove_boilerplate(text: str, max_words: int) -> str:
    """Drops short lines that match web boilerplate phrases (long lines are kept: real prose can
    mention cookies)."""
    out = []
    for line in text.split("\n"):
        if len(line) < 8 * max_words and _BOILERPLATE.search(line):
            if len(line.split()) <= max_words:
                continue
        out.append(line)
    return "\n".join(out)


def clean_text(text: str, *, is_code: bool, is_web: bool, cfg: dict) -> str:
    """The cleaned text (possibly empty; the caller rejects empty results)."""
    if cfg["ftfy"] and not text.isascii():
        text = ftfy.fix_text(text, _FTFY_CONFIG)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg["nfc"] and not text.isascii():
        text = unicodedata.normalize("NFC", text)
        text = _ODD_SPACE.sub(" ", text)
    text = _CONTROL.sub("", text)
    if not is_code and ("  " in text or "\t" in text):
        text = _INNER_SPACES.sub(" ", text)
    if " \n" in text or "\t\n" in text:
        text = _TRAILING.sub("", text)
    if is_web and cfg["boilerplate"]:
        text = remove_boilerplate(text, cfg["boilerplate_max_words"])
    text = _BLANK_RUNS.sub("\n\n", text)
    return text.strip("\n") if is_code else text.strip()
