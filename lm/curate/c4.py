"""The C4 page cleaner (Raffel et al. 2020), with the values of its reference implementation.

Unlike the other quality filters, C4 both edits and filters: it keeps only lines that end in
terminal punctuation and have at least 3 words, drops lines mentioning javascript or cookie and
privacy policies, strips citation markers, and then drops the whole page when fewer than 5
sentences remain, when it contains "lorem ipsum" or a curly brace (a code smell), or a bad word.
"""

from __future__ import annotations

import re
from typing import Any

from lm.curate.safety import Blocklist

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_BLANK_RUNS = re.compile(r"\n{3,}")
_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


class C4Filter:
    """Configured once per worker (the bad-word regex is compiled in the constructor)."""

    def __init__(self, cfg: dict[str, Any], bad_words: list[str]):
        self.cfg = cfg
        self.end_marks = tuple(cfg["end_marks"])
        self.bad_words = Blocklist(bad_words, 1, 0.0) if cfg["reject_bad_words"] else None

    def __call__(self, text: str, words: set[str] | list[str]) -> tuple[str, str | None]:
        """Returns (cleaned text, None) to keep, or (text, reason) to reject; `words` are the
        text's lowercased words (TextView.word_set), for the bad-word lookup."""
        cfg = self.cfg
        lower_text = text.lower()
        if cfg["reject_lorem_ipsum"] and "lorem ipsum" in lower_text:
            return text, "lorem_ipsum"
        if cfg["reject_curly_brace"] and "{" in text:
            return text, "curly_brace"
        if self.bad_words is not None and self.bad_words.hits(words, lower_text):
            return text, "bad_words"
        kept: list[str] = []
        sentences = 0
        changed = False
        max_word = cfg["max_word_length"]
        # Whole-page substring checks first: most pages never need the per-line lookups.
        check_js = cfg["drop_javascript_lines"] and "javascript" in lower_text
        check_policy = cfg["drop_policy_lines"] and any(p in lower_text for p in _POLICY)
        for raw in text.split("\n"):
            line = raw.strip()
            if not line:
                kept.append("")
                continue
            if "[" in line and _CITATION.search(line):
                line = " ".join(_CITATION.sub("", line).split())
                changed = True
            kept.append(line)
            changed |= line != raw
            if not line.endswith(self.end_marks) or line.endswith("..."):
                kept[-1] = None
                continue
            min_words = cfg["min_words_per_line"]
            if (
                len(line.split(None, min_words)) < min_words
                or (len(line) > max_word and max(map(len, line.split())) > max_word)
                or (check_js and "javascript" in line.lower())
                or (check_policy and any(p in line.lower() for p in _POLICY))
            ):
                kept[-1] = None
                continue
            # Sentence ends inside the line, plus the line's own end (it ends in a mark).
            sentences += 1 + line.count(". ") + line.count("! ") + line.count("? ")
        if sentences < cfg["min_sentences"]:
            return text, "too_few_sentences"
        if not changed and None not in kept:
            return text, None
        out = "\n".join(s for s in kept if s is not None)
        return _BLANK_RUNS.sub("\n\n", out).strip(), None
