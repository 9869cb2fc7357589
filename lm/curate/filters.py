"""Prose quality filters: Gopher quality, Gopher repetition (Rae et al. 2021) and FineWeb's rules.

Each filter takes the shared `TextView` and its config group (a plain dict) and returns None to
keep the document or a short reason string (`<rule>`) naming the rule that removed it; the reasons
are what the report counts. Every threshold is a config default (lm/curate/config.py) and
overridable with `--config.<group>.<key>=value`; the defaults and each comparison (`>` or `>=`)
follow the references:
- Gopher quality: Rae et al. 2021, appendix A.1.1, as in datatrove 0.10.1's `GopherQualityFilter`
  (datatrove/pipeline/filters/gopher_quality_filter.py): 50..100,000 words, mean word length
  3..10, at most 0.1 `#` per word and, separately, 0.1 ellipses per word, at most 90% of lines
  starting with a bullet, 30% ending with an ellipsis, at least 80% of words with a letter, at
  least 2 of the 8 stop words.
- Gopher repetition: Table A1 (datatrove's `GopherRepetitionFilter`): duplicate line / paragraph
  fraction 0.30, their character fractions 0.20, top 2/3/4-gram character fraction 0.20/0.18/0.16,
  duplicate 5..10-gram character fraction 0.15..0.10.
- FineWeb: datatrove 0.10.1's `FineWebQualityFilter` (fineweb_quality_filter.py) defaults, over
  the non-empty lines: reject when under 12% of them end in a sentence terminal (. ! ? and their
  other-script forms), when over 67% have at most 30 characters, when repeated lines hold over
  1% of the page's non-newline characters, and when there are over 0.3 newlines per word.
Words are whitespace-separated here where the references use NLTK's tokenizer (which also splits
off punctuation); the thresholds are the same.
"""

from __future__ import annotations

import string
from typing import Any

from lm.curate.textstats import (
    TextView,
    duplicate_chars,
    duplicate_fraction,
    duplicate_ngram_char_fraction,
    top_ngram_char_fraction,
)

# Bytes that are not letters: ASCII digits and punctuation. Deleting them from the UTF-8 bytes
# and splitting again leaves exactly the words that had some other character (a letter, in all
# but rare cases of non-ASCII symbols): a C-speed count of Gopher's "words with a letter".
_NOT_LETTER_BYTES = (string.digits + string.punctuation).encode("ascii")
_BULLETS = ("-", "*", "•", "‣", "◦", "⁃", "●", "▪", "–", "—", "·")
_ELLIPSES = ("...", "…")
# FineWeb's `stop_chars` default is datatrove's TERMINAL_PUNCTUATION, Unicode's sentence
# terminals: of ASCII only . ! ? (not quotes, colons or semicolons). These are its members for
# the scripts langid names most often.
_TERMINAL = (
    ".", "!", "?", "。", "！", "？", "．", "｡", "‼", "‽", "⁇", "⁈", "⁉", "։", "؟", "۔",
    "।", "॥", "።", "၊", "။", "។",
)  # fmt: skip


def _csv(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def gopher_quality(view: TextView, cfg: dict[str, Any]) -> str | None:
    """Gopher's quality heuristics: document length, word shape, symbols, bullets, stop words."""
    words = view.words
    n = len(words)
    if n < cfg["min_words"]:
        return "too_few_words"
    if n > cfg["max_words"]:
        return "too_many_words"
    norm = view.norm_words
    mean_len = sum(map(len, norm)) / max(len(norm), 1)
    if mean_len < cfg["min_mean_word_length"]:
        return "mean_word_length_low"
    if mean_len > cfg["max_mean_word_length"]:
        return "mean_word_length_high"
    text = view.text
    # "symbol-to-word ratio greater than 0.1 for either the hash symbol or the ellipsis"
    if text.count("#") / n > cfg["max_symbol_word_ratio"]:
        return "symbol_word_ratio"
    if (text.count("...") + text.count("…")) / n > cfg["max_symbol_word_ratio"]:
        return "symbol_word_ratio"
    lines = view.nonempty_lines
    if lines:
        bullets = sum(1 for s in lines if s.startswith(_BULLETS))
        if bullets / len(lines) > cfg["max_bullet_lines_frac"]:
            return "bullet_lines"
        ellipses = sum(1 for s in lines if s.endswith(_ELLIPSES))
        if ellipses / len(lines) > cfg["max_ellipsis_lines_frac"]:
            return "ellipsis_lines"
    alpha = len(text.encode("utf-8").translate(None, _NOT_LETTER_BYTES).split())
    if alpha / n < cfg["min_alpha_words_frac"]:
        return "alpha_words"
    stop, need, found = frozenset(_csv(cfg["stop_words"])), cfg["min_stop_words"], 0
    for w in norm:
        if w in stop:
            found += 1
            if found >= need:
                break
    if found < need:
        return "stop_words"
    return None


def gopher_repetition(view: TextView, cfg: dict[str, Any]) -> str | None:
    """Gopher's repetition removal: repeated lines, paragraphs and word n-grams."""
    line_frac, line_chars = duplicate_fraction(view.nonempty_lines)
    if line_frac > cfg["max_dup_line_frac"]:
        return "dup_line_frac"
    para_frac, para_chars = duplicate_fraction(view.paragraphs)
    if para_frac > cfg["max_dup_para_frac"]:
        return "dup_para_frac"
    if line_chars > cfg["max_dup_line_char_frac"]:
        return "dup_line_char_frac"
    if para_chars > cfg["max_dup_para_char_frac"]:
        return "dup_para_char_frac"
    for n, limit in zip((2, 3, 4), cfg["max_top_ngram_char_frac"]):
        if top_ngram_char_fraction(view, n) > limit:
            return f"top_{n}gram_char_frac"
    # Coverage by repeated n-grams never grows with n (a repeated (n+1)-gram is covered by two
    # repeated n-grams), so when n=5 is under every larger n's limit, they all pass.
    limits = list(zip(range(5, 11), cfg["max_dup_ngram_char_frac"]))
    for i, (n, limit) in enumerate(limits):
        frac = duplicate_ngram_char_fraction(view, n)
        if frac > limit:
            return f"dup_{n}gram_char_frac"
        if frac <= min((lim for _, lim in limits[i + 1 :]), default=1.0):
            break
    return None


def fineweb_quality(view: TextView, cfg: dict[str, Any]) -> str | None:
    """FineWeb's extra rules: too few lines ending in punctuation, too many short or repeated
    lines, and list-like pages (many newlines per word)."""
    lines = [s for s in view.lines if s.strip()]
    if not lines:
        return "no_lines"
    text = view.text
    punct = sum(1 for s in lines if s.endswith(_TERMINAL))
    if punct / len(lines) < cfg["min_line_punct_frac"]:
        return "line_punct_frac"
    short = sum(1 for s in lines if len(s) <= cfg["short_line_chars"])
    if short / len(lines) > cfg["max_short_line_frac"]:
        return "short_line_frac"
    _, dup_chars = duplicate_chars(lines)
    if dup_chars / max(len(text) - text.count("\n"), 1) > cfg["max_dup_line_char_frac"]:
        return "dup_line_char_frac"
    if text.count("\n") / max(len(view.words), 1) > cfg["max_newline_word_ratio"]:
        return "list_like"
    return None
