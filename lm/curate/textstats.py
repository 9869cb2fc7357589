"""One tokenization per document, shared by every filter and by MinHash.

The quality filters, the repetition statistics, decontamination and MinHash all look at the same
words and lines. Splitting, lowercasing and hashing them once (lazily, on first use) is what keeps
the per-document chain at well over a thousand documents per second per core: the n-gram
statistics then run as a handful of vectorized numpy operations over 64-bit word hashes instead
of Python loops over tuples of strings.
"""

from __future__ import annotations

import re
import string
from functools import cached_property

import numpy as np
import xxhash

# Punctuation (ASCII and common Unicode) and underscores become spaces, then a plain split:
# several times faster than a regex word scan, and the same words for ordinary text.
_PUNCT_TO_SPACE = str.maketrans(
    {c: " " for c in string.punctuation + "“”‘’„«»‹›…–—―¿¡、。，！？：；（）［］｛｝「」『』·•"}
)
_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n")
# Odd 64-bit multiplier for the polynomial n-gram hash (wraps modulo 2**64, which is intended).
_NGRAM_MUL = np.uint64(0x9E3779B97F4A7C15)
_hash64 = xxhash.xxh64_intdigest


_CACHE: dict[str, int] = {}
_CACHE_LIMIT = 2_000_000


def hash_words(words: list[str]) -> np.ndarray:
    """Stable 64-bit hashes (the same in every process, unlike `hash()`), one per word.

    Word frequencies are Zipfian, so a per-process cache turns most lookups into a C-level
    dict access; only words never seen before are hashed."""
    cache = _CACHE
    missing = set(words).difference(cache)
    if missing:
        if len(cache) + len(missing) > _CACHE_LIMIT:
            cache.clear()
            missing = set(words)
        for w in missing:
            cache[w] = _hash64(w.encode("utf-8"))
    return np.fromiter(map(cache.__getitem__, words), dtype=np.uint64, count=len(words))


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every run of `n` consecutive words, computed for all positions at once."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    out = word_hashes[:count].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            out *= _NGRAM_MUL
            out += word_hashes[k : k + count]
    return out


class TextView:
    """Lazily computed views of one document's text; each is computed at most once."""

    __slots__ = ("text", "__dict__")

    def __init__(self, text: str):
        self.text = text

    @cached_property
    def lines(self) -> list[str]:
        return self.text.split("\n")

    @cached_property
    def nonempty_lines(self) -> list[str]:
        return [s for s in (line.strip() for line in self.lines) if s]

    @cached_property
    def paragraphs(self) -> list[str]:
        return [p.strip() for p in _PARAGRAPH_SPLIT.split(self.text) if p.strip()]

    @cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @cached_property
    def lower_text(self) -> str:
        return self.text.lower()

    @cached_property
    def norm_words(self) -> list[str]:
        """Lowercased words with punctuation removed (punctuation also splits words)."""
        return self.lower_text.translate(_PUNCT_TO_SPACE).split()

    @cached_property
    def word_set(self) -> frozenset[str]:
        """Distinct `norm_words`: set lookups (blocklists) then cost per distinct word."""
        return frozenset(self.norm_words)

    @cached_property
    def word_hashes(self) -> np.ndarray:
        """Hashes of `norm_words`: repetition statistics, MinHash and decontamination all use
        these (robust to case and punctuation), so words are hashed once per document."""
        return hash_words(self.norm_words)

    def ngrams(self, n: int) -> np.ndarray:
        """Hashes of every word n-gram, built incrementally from the (n-1)-grams and cached."""
        cache = self.__dict__.setdefault("_ngrams", {1: self.word_hashes})
        if n not in cache:
            prev = self.ngrams(n - 1)
            count = max(len(self.word_hashes) - n + 1, 0)
            with np.errstate(over="ignore"):
                cache[n] = prev[:count] * _NGRAM_MUL + self.word_hashes[n - 1 : n - 1 + count]
        return cache[n]

    @cached_property
    def total_word_chars(self) -> int:
        return len("".join(self.norm_words))

    @cached_property
    def word_lengths(self) -> np.ndarray:
        """Characters per word of `norm_words` (weights for the n-gram character fractions)."""
        return np.fromiter(map(len, self.norm_words), dtype=np.int64, count=len(self.norm_words))


def duplicate_chars(items: list[str]) -> tuple[int, int]:
    """(items that repeat an earlier one, characters in those items): datatrove's
    `find_duplicates`, which FineWeb divides by the page's own character count."""
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    return dup_items, dup_chars


def duplicate_fraction(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in those items)."""
    if not items:
        return 0.0, 0.0
    dup_items, dup_chars = duplicate_chars(items)
    return dup_items / len(items), dup_chars / max(sum(map(len, items)), 1)


def top_ngram_char_fraction(view: TextView, n: int) -> float:
    """Characters covered by the most frequent word n-gram, over all word characters."""
    total = view.total_word_chars
    grams = view.ngrams(n)
    if total == 0 or len(grams) < 2:
        return 0.0
    ordered = np.sort(grams)
    starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
    runs = np.diff(np.append(starts, len(ordered)))
    best = int(np.argmax(runs))
    if runs[best] <= 1:
        return 0.0
    first = int(np.argmax(grams == ordered[starts[best]]))
    gram_chars = sum(map(len, view.norm_words[first : first + n]))
    return gram_chars * int(runs[best]) / total


def duplicate_ngram_char_fraction(view: TextView, n: int) -> float:
    """Characters inside any repeated occurrence of a word n-gram (each counted once)."""
    total = view.total_word_chars
    grams = view.ngrams(n)
    if total == 0 or len(grams) < 2:
        return 0.0
    # A stable sort keeps equal n-grams in text order: all but the first of each run repeat.
    order = np.argsort(grams, kind="stable")
    ordered = grams[order]
    repeats = order[1:][ordered[1:] == ordered[:-1]]
    if len(repeats) == 0:
        return 0.0
    cover = np.zeros(len(view.word_lengths) + 1, dtype=np.int64)
    cover[repeats] += 1  # start positions are distinct, so plain fancy indexing is exact
    cover[repeats + n] -= 1
    mask = np.cumsum(cover[:-1]) > 0
    return int(view.word_lengths[mask].sum()) / total
