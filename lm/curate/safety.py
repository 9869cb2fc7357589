"""Harmful content and privacy: a word/phrase blocklist, a URL (domain) blocklist, PII scrubbing.

PII is replaced, not dropped: a page that happens to contain an email address is still good
text, so the address becomes `<EMAIL>` and the count per kind is kept on the document (and
summed in the report). Secrets (cloud keys, tokens, private key blocks, `api_key = "..."`) are
treated the same way; for assignments only the value is replaced so the code stays readable.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from lm import storage

# A deliberately small default; real runs point `blocklist.file` at a maintained list.
DEFAULT_BLOCKLIST = (
    "porn", "porno", "pornhub", "hardcore sex", "nude pics", "sex cam", "camgirl",
    "escort service", "milf", "hentai", "rape", "child abuse", "bestiality", "incest",
    "white power", "heil hitler", "kill yourself", "buy viagra", "cialis", "online casino",
)  # fmt: skip


def load_word_list(inline: str, path: str, default: Iterable[str] = ()) -> list[str]:
    """Comma-separated `inline` words plus one-per-line `path`; `default` when both are empty."""
    words = [w.strip().lower() for w in inline.split(",") if w.strip()]
    if path:  # storage.read_text: local or gs://; refuses a FIFO or device (it would block)
        lines = storage.read_text(path).splitlines()
        words += [s.strip().lower() for s in lines if s.strip() and not s.startswith("#")]
    return words or [w.lower() for w in default]


class Blocklist:
    """Counts blocklisted words and phrases; rejects above a count and a per-word fraction.

    Single words are looked up in a set of the document's words; the phrase regex (slow: it
    needs word boundaries) only runs when the document contains some phrase's first word."""

    def __init__(self, words: list[str], min_hits: int, max_fraction: float):
        self.single = frozenset(w for w in words if " " not in w)
        phrases = sorted((w for w in words if " " in w), key=len, reverse=True)
        self.first_words = frozenset(p.split()[0] for p in phrases)
        alternation = "|".join(re.escape(p) for p in phrases)
        self.phrases = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)") if phrases else None
        self.min_hits = min_hits
        self.max_fraction = max_fraction

    def hits(self, words: list[str] | set[str], lower_text: str, word_set=None) -> int:
        """Occurrences of listed words and phrases. `words` may be the document's word list or
        its word set (then each listed word counts once); `word_set`, when given, makes the
        common no-hit case a set intersection over distinct words."""
        distinct = word_set if word_set is not None else words
        count = 0
        if not self.single.isdisjoint(distinct):
            count = sum(1 for w in words if w in self.single)
        if self.phrases is not None and not self.first_words.isdisjoint(distinct):
            count += len(self.phrases.findall(lower_text))
        return count

    def check(self, norm_words: list[str], lower_text: str, word_set=None) -> str | None:
        hits = self.hits(norm_words, lower_text, word_set)
        if hits >= self.min_hits and hits / max(len(norm_words), 1) > self.max_fraction:
            return "blocklisted_words"
        return None


class UrlBlocklist:
    """Rejects documents whose URL host is, or is under, a blocklisted domain."""

    def __init__(self, domains: list[str]):
        self.domains = frozenset(d.lower().lstrip(".") for d in domains)

    def check(self, url: str) -> str | None:
        if not url or not self.domains:
            return None
        host = (urlsplit(url if "//" in url else "//" + url).hostname or "").lower()
        parts = host.split(".")
        for i in range(len(parts) - 1):
            if ".".join(parts[i:]) in self.domains:
                return "blocklisted_domain"
        return None


# Python's regex engine is fast only when a pattern starts with a literal or a character class
# (it then skips ahead in C); patterns starting with a lookbehind or `\b` cost ~100 ns per
# character. So each kind has a cheap trigger (substrings, or a class-prefixed regex), and the
# full pattern runs only on texts the trigger fires on; boundary checks that would need a leading
# lookbehind are done in Python on the (rare) candidates instead.
_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_IPV6_TRIGGER = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6 = re.compile(r"[0-9A-Fa-f:]*:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:]*")
_PHONE_TRIGGER = re.compile(r"[0-9][0-9][0-9][ .-][0-9][0-9][0-9][0-9]")
_PHONE = re.compile(
    r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-]|\.\d)"
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# (kind, compiled pattern, trigger: substrings or a regex, placeholder)
_PATTERNS: list[tuple[str, re.Pattern[str], Any, str]] = [
    (
        "private_key",
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?"
            r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
            re.DOTALL,
        ),
        ("PRIVATE KEY",),
        "<PRIVATE_KEY>",
    ),
    (
        "aws_key",
        re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b"),
        ("AKIA", "ASIA", "AGPA", "AIDA", "AROA"),
        "<AWS_KEY>",
    ),
    (
        "github_token",
        re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})\b"),
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        "<GITHUB_TOKEN>",
    ),
    ("slack_token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"), ("xox",), "<SLACK_TOKEN>"),
    ("google_api_key", re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b"), ("AIza",), "<GOOGLE_API_KEY>"),
    ("email", _EMAIL, ("@",), "<EMAIL>"),
    ("ipv4", _IPV4, re.compile(r"[0-9]\.[0-9]"), "<IPV4>"),
    ("ipv6", _IPV6, _IPV6_TRIGGER, "<IPV6>"),
    ("phone", _PHONE, _PHONE_TRIGGER, "<PHONE>"),
]
_SECRET_WORDS = ("key", "secret", "token", "passw")
# `api_key = "value"`: the name and quotes stay, the value goes (run on trigger lines only).
_SECRET_ASSIGN = re.compile(
    r"(?i)(\b[\w.-]*(?:api[_-]?key|secret|token|passwd|password|access[_-]?key)[\w.-]*\b"
    r"[\"']?\s*[:=]\s*)([\"'])([^\"'\s]{8,})\2"
)


def _boundary_ok(text: str, start: int, end: int, before: str, after: str) -> bool:
    """No character of `before` right before the match and none of `after` right after it."""
    if start > 0 and (text[start - 1].isalnum() or text[start - 1] in before):
        return False
    if end < len(text) and (text[end].isalnum() or text[end] in after):
        return False
    return True


def _valid_ipv4(text: str, m: re.Match[str]) -> bool:
    if not _boundary_ok(text, m.start(), m.end(), "._", "_"):
        return False
    if m.end() + 1 < len(text) and text[m.end()] == "." and text[m.end() + 1].isdigit():
        return False
    return all(int(part) <= 255 and (part == "0" or part[0] != "0") for part in m[0].split("."))


def _valid_ipv6(text: str, m: re.Match[str]) -> bool:
    candidate = m[0]
    if not _boundary_ok(text, m.start(), m.end(), "_.", "_"):
        return False
    groups = [g for g in candidate.split(":") if g]
    if len(groups) < 2 or (len(groups) < 3 and "::" not in candidate):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


_VALIDATORS = {"ipv4": _valid_ipv4, "ipv6": _valid_ipv6}
_NEEDS_DIGIT = frozenset({"ipv4", "phone"})
_DIGITS = "0123456789"


def _triggered(text: str, trigger: Any) -> bool:
    if isinstance(trigger, re.Pattern):
        return trigger.search(text) is not None
    return any(t in text for t in trigger)


class PiiScrubber:
    """Replaces PII and secrets with placeholders, counting replacements per kind."""

    def __init__(self, kinds: list[str]):
        wanted = set(kinds)
        unknown = wanted - set(PII_KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {PII_KINDS}")
        self.patterns = [p for p in _PATTERNS if p[0] in wanted]
        self.secrets = "secret_assignment" in wanted

    def scrub(self, text: str) -> tuple[str, dict[str, int]]:
        counts: dict[str, int] = {}
        has_digit = any(d in text for d in _DIGITS)  # ten memchr scans: far cheaper than a regex
        for kind, pattern, trigger, placeholder in self.patterns:
            if (kind in _NEEDS_DIGIT and not has_digit) or not _triggered(text, trigger):
                continue
            validate = _VALIDATORS.get(kind)
            if validate is None:
                text, n = pattern.subn(placeholder, text)
            else:
                n = 0
                pieces, last = [], 0
                for m in pattern.finditer(text):
                    if validate(text, m):
                        pieces += [text[last : m.start()], placeholder]
                        last = m.end()
                        n += 1
                if n:
                    text = "".join(pieces) + text[last:]
            if n:
                counts[kind] = counts.get(kind, 0) + n
        if self.secrets:
            lower = text.lower()
            if any(w in lower for w in _SECRET_WORDS):
                lines = text.split("\n")
                n = 0
                for i, line in enumerate(lines):
                    low = line.lower()
                    if any(w in low for w in _SECRET_WORDS) and ("=" in line or ":" in line):
                        lines[i], k = _SECRET_ASSIGN.subn(r"\1\2<SECRET>\2", line)
                        n += k
                if n:
                    text = "\n".join(lines)
                    counts["secret_assignment"] = n
        return text, counts


PII_KINDS = [p[0] for p in _PATTERNS] + ["secret_assignment"]
