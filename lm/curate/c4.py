"""The C4 page cleaner (Raffel et al. 2020), rule for rule as its reference implementation.

Reference: TensorFlow Datasets' `tensorflow_datasets/text/c4_utils.py` (`clean_page`, and
`get_badwords_filter_fn`, which `c4.py` applies to the cleaned page), with its values:
`_MIN_WORDS_PER_LINE = 5`, `_MIN_NUM_SENTENCES = 3`, `_MAX_WORD_LENGTH = 1000`,
`_END_MARKS = (".", "?", "!", '"')`, `_ELLIPSIS = "..."`, the six `_POLICY_SUBSTRINGS` below and
the citation regex `\\[\\d*\\]|\\[edit\\]|\\[citation needed\\]` (case-sensitive).

Per line, in the reference's order: strip; drop a line with a word over 1,000 characters; remove
citation markers; drop a line that does not end in an end mark or ends in "..."; drop a line of
fewer than 5 words; reject the page if the line says "lorem ipsum"; drop a line mentioning
javascript; reject the page if the line has a curly brace; drop a policy/cookie line. Only lines
that got that far count, so a `{` or "lorem ipsum" on a line the line filter drops anyway does not
reject the page. The page is rejected when its kept lines have fewer than 3 sentences, or (after
cleaning) contain a bad word. The kept lines are joined with "\\n", as in the reference (blank
lines, which never pass the end-mark rule, are not kept).

One deliberate difference: the reference counts sentences with NLTK's punkt tokenizer (a model it
downloads at run time); here a line's sentences are its end marks followed by a space, plus one
for the end mark that ends it. A test runs the reference `clean_page` with this counter in place
of punkt and checks that both give the same pages.
"""

from __future__ import annotations

import re
from typing import Any

from lm.curate.safety import Blocklist
from lm.curate.textstats import TextView

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_ELLIPSIS = "..."
_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


def count_sentences(line: str) -> int:
    """Sentences in a kept line (which ends in an end mark): inner ". ", "! ", "? " plus one."""
    return 1 + line.count(". ") + line.count("! ") + line.count("? ")


class C4Filter:
    """Configured once per worker (the bad-word lookup is built in the constructor)."""

    def __init__(self, cfg: dict[str, Any], bad_words: list[str]):
        self.cfg = cfg
        self.end_marks = tuple(cfg["end_marks"])
        self.bad_words = Blocklist(bad_words, 1, 0.0) if cfg["reject_bad_words"] else None

    def __call__(self, text: str, words: set[str] | list[str]) -> tuple[str, str | None]:
        """Returns (cleaned text, None) to keep, or (text, reason) to reject. `words` are the
        text's lowercased words (TextView.word_set); the bad-word rule uses them when cleaning
        left the text unchanged, and the cleaned text's words otherwise."""
        cfg = self.cfg
        # Whole-page substring checks first: most pages never need the per-line lookups. They
        # look at the page without citation markers, as the line rules do ("java[1]script").
        check_citation = "[" in text
        lower_text = (_CITATION.sub("", text) if check_citation else text).lower()
        check_lorem = cfg["reject_lorem_ipsum"] and "lorem ipsum" in lower_text
        check_js = cfg["drop_javascript_lines"] and "javascript" in lower_text
        check_brace = cfg["reject_curly_brace"] and "{" in text
        check_policy = cfg["drop_policy_lines"] and any(p in lower_text for p in _POLICY)
        max_word, min_words = cfg["max_word_length"], cfg["min_words_per_line"]
        kept: list[str] = []
        sentences = 0
        for raw in text.splitlines():
            line = raw.strip()
            if len(line) > max_word and max(map(len, line.split()), default=0) > max_word:
                continue
            if check_citation and "[" in line:
                line = _CITATION.sub("", line)
            if not line.endswith(self.end_marks) or line.endswith(_ELLIPSIS):
                continue
            if len(line.split(None, min_words)) < min_words:
                continue
            lower = line.lower() if (check_lorem or check_js or check_policy) else ""
            if check_lorem and "lorem ipsum" in lower:
                return text, "lorem_ipsum"
            if check_js and "javascript" in lower:
                continue
            if check_brace and "{" in line:
                return text, "curly_brace"
            if check_policy and any(p in lower for p in _POLICY):
                continue
            sentences += count_sentences(line)
            kept.append(line)
        if sentences < cfg["min_sentences"]:
            return text, "too_few_sentences"
        out = "\n".join(kept).strip()
        if self.bad_words is not None:
            lower_out = out.lower()
            out_words = words if out == text else TextView(out).word_set
            if self.bad_words.hits(out_words, lower_out):
                return text, "bad_words"
        return out, None
