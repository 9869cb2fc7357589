"""Decoding and text cleanup: bytes -> valid, normalized Unicode text.

Decoding is strict: a file that is not valid UTF-8 (or looks binary) is rejected with a reason
rather than decoded with replacement characters, so nothing garbled enters training data silently.
Cleanup repairs mojibake (ftfy), NFC-normalizes, drops control characters, normalizes newlines
and odd spaces, and for web pages removes boilerplate lines (cookie banners, share buttons...).
Code keeps its indentation and inner spacing; prose gets runs of spaces collapsed.
"""

from __future__ import annotations

import re
import unicodedata

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
    if not raw or not raw.strip():
        return None, "empty"
    if b"\x00" in raw[:binary_probe]:
        return None, "binary"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    return text, None


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
