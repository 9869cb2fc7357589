"""The C4 page cleaner (Raffel et al. 2020), with the values of its reference implementation.

Unlike the other quality filters, C4 both edits and filters: it keeps only lines that end in
terminal punctuation and have at least 3 words, drops lines mentioning javascript or cookie and
privacy policies, strips citation markers, and then drops the whole page when fewer than 5
sentences remain, when it contains "lorem ipsum" or a curly brace (a code smell), or a bad word.
"""

from __future__ import annotations

import re
from typing import Any

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?:\s|$)")
_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


def _words_regex(words: list[str]) -> re.Pattern[str] | None:
    """One alternation with word boundaries: a single scan finds any listed word or phrase."""
    if not words:
        return None
    alternation = "|".join(sorted((re.escape(w.lower()) for w in words), key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternation})(?!\w)")


class C4Filter:
    """Configured once per worker (the bad-word regex is compiled in the constructor)."""

    def __init__(self, cfg: dict[str, Any], bad_words: list[str]):
        self.cfg = cfg
        self.end_marks = tuple(cfg["end_marks"])
        self.bad_words = _words_regex(bad_words) if cfg["reject_bad_words"] else None

    def __call__(self, text: str) -> tuple[str, str | None]:
        """Returns (cleaned text, None) to keep, or (text, reason) to reject."""
        cfg = self.cfg
        lower_text = text.lower()
        if cfg["reject_lorem_ipsum"] and "lorem ipsum" in lower_text:
            return text, "lorem_ipsum"
        if cfg["reject_curly_brace"] and "{" in text:
            return text, "curly_brace"
        if self.bad_words is not None and self.bad_words.search(lower_text):
            return text, "bad_words"
        kept: list[str] = []
        sentences = 0
        max_word = cfg["max_word_length"]
        for raw in text.split("\n"):
            line = raw.strip()
            if not line:
                continue
            if _CITATION.search(line):
                line = _CITATION.sub("", line).strip()
            if not line.endswith(self.end_marks) or line.endswith("..."):
                continue
            words = line.split()
            if len(words) < cfg["min_words_per_line"]:
                continue
            if max(map(len, words)) > max_word:
                continue
            lower = line.lower()
            if cfg["drop_javascript_lines"] and "javascript" in lower:
                continue
            if cfg["drop_policy_lines"] and any(p in lower for p in _POLICY):
                continue
            sentences += max(1, len(_SENTENCE_END.findall(line)))
            kept.append(line)
        if sentences < cfg["min_sentences"]:
            return text, "too_few_sentences"
        return "\n".join(kept), None
