"""Deduplication and decontamination primitives (the Beam stages live in dedup_stages.py).

- Exact: a hash of the normalized text (lowercased, punctuation-free words) groups documents that
  differ only in case, spacing or punctuation.
- Near: MinHash over word 5-grams with `bands x rows` locality-sensitive hashing (FineWeb's
  14 x 8 by default). The permutations are multiply-shift hashes over 64-bit shingle hashes,
  applied to all shingles and all permutations as one numpy broadcast.
- Clusters: connected components of the candidate pairs; the smallest id is kept, which is
  deterministic whatever order the runner delivers pairs in. `connected_components` is the
  in-memory union-find (the reference); `large_star` / `small_star` are the two per-node steps
  that dedup_stages.py runs as shuffles so that no worker holds all pairs.
- Decontamination: 13-gram hashes of registered evaluation sets; a document sharing any 13-gram
  with them is removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import xxhash

from lm import jsonio, storage
from lm.curate.textstats import TextView, hash_words, ngram_hashes
from lm.errors import DataError


def exact_key(view: TextView) -> str:
    """Hex hash of the normalized words: equal for documents differing only in case/spacing."""
    return xxhash.xxh128_hexdigest(" ".join(view.norm_words).encode("utf-8"))


class MinHasher:
    """MinHash signatures and LSH band keys; the same seed gives the same keys in every worker.

    Each permutation is x -> (a * x + b) mod 2**32 with odd a (a bijection of 32-bit values)
    applied to the top 32 bits of each shingle's 64-bit hash: one uint32 broadcast over all
    permutations and shingles, ~3x faster than 64-bit arithmetic and good enough for LSH (the
    minimum is decided by the well-mixed high bits)."""

    def __init__(self, bands: int = 14, rows: int = 8, ngram: int = 5, seed: int = 1):
        self.bands, self.rows, self.ngram = bands, rows, ngram
        rng = np.random.default_rng(seed)
        n = bands * rows
        self.mul = (rng.integers(0, 2**32, size=n, dtype=np.uint64) | np.uint64(1)).astype(
            np.uint32
        )[:, None]
        self.add = rng.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32)[:, None]

    def signature(self, view: TextView) -> np.ndarray | None:
        """`bands * rows` uint32 minima, or None when the text has fewer words than one shingle."""
        shingles = view.ngrams(self.ngram)
        if len(shingles) == 0:
            return None
        x = (shingles >> np.uint64(32)).astype(np.uint32)
        hashed = self.mul * x[None, :]
        hashed += self.add
        return hashed.min(axis=1)

    def band_keys(self, signature: np.ndarray) -> list[str]:
        """One bucket key per band: band index + hash of that band's rows."""
        rows = signature.reshape(self.bands, self.rows)
        return [f"{b}:{xxhash.xxh64_hexdigest(rows[b].tobytes())}" for b in range(self.bands)]

    @staticmethod
    def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.mean(a == b))


def bucket_pairs(ids: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Candidate pairs of one LSH bucket as a star around its smallest id (enough to connect
    the bucket, with len-1 pairs instead of len^2/2)."""
    members = sorted(set(ids))
    for other in members[1:]:
        yield members[0], other


def connected_components(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Union-find over pairs: id -> smallest id of its component (only ids in some pair)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in pairs:
        parent.setdefault(a, a)
        parent.setdefault(b, b)
        ra, rb = find(a), find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            parent[rb] = ra
    return {x: find(x) for x in parent}


def large_star(node: str, neighbors: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Large-star step (Kiveris et al. 2014) at `node`, given all its neighbours: every strictly
    larger neighbour is re-linked to the smallest id of node's closed neighbourhood.

    Edges come out as (larger, smaller). Connectivity is preserved: the edge from `node` to a
    smaller neighbour m is re-emitted by the large-star of that neighbour."""
    nbrs = set(neighbors)
    low = min(min(nbrs), node) if nbrs else node
    for v in nbrs:
        if v > node:
            yield v, low


def small_star(node: str, smaller: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Small-star step (Kiveris et al. 2014) at `node`, given its smaller neighbours (at least
    one): node and each smaller neighbour are linked to the smallest of them.

    Edges come out as (larger, smaller); the self-loop of the smallest is dropped."""
    nbrs = set(smaller)
    low = min(nbrs)
    for v in nbrs:
        if v != low:
            yield v, low
    yield node, low


# Evaluation sets: name -> function yielding texts. Paths in config are loaded directly.
EVAL_SETS: dict[str, Callable[[], Iterable[str]]] = {}


def register_eval_set(name: str, loader: Callable[[], Iterable[str]]) -> None:
    """Registers an evaluation set so configs can name it in `decontam.eval_sets`."""
    EVAL_SETS[name] = loader


def read_eval_file(path: str, field: str = "text") -> Iterator[str]:
    """Texts of an eval-set file: JSONL (every string value of `field`, or of all fields when
    absent) or plain text (one example per non-empty line). Read whole through `lm.storage`
    (which refuses a FIFO or device); a bad JSONL line is a one-line DataError naming it."""
    text = storage.read_text(path)
    if not path.endswith((".jsonl", ".json")):
        for line in text.splitlines():
            line = line.strip().removeprefix("\ufeff")
            if line:
                yield line
        return
    try:
        records = list(jsonio.jsonl_objects(text, path))
    except jsonio.JSONError as e:
        raise DataError(str(e)) from None
    for _, record in records:
        if field in record:
            yield str(record[field])
        else:
            yield " ".join(str(v) for v in record.values() if isinstance(v, str))


def eval_texts(spec: str) -> Iterator[str]:
    """Texts of every comma-separated registered name or file path in `spec`."""
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in EVAL_SETS:
            yield from EVAL_SETS[item]()
        else:
            yield from read_eval_file(item)


class Decontaminator:
    """Rejects documents that share any word n-gram (13 by default) with the evaluation texts."""

    def __init__(self, texts: Iterable[str], ngram: int = 13):
        self.ngram = ngram
        grams = [ngram_hashes(hash_words(TextView(t).norm_words), ngram) for t in texts]
        self.index = np.unique(np.concatenate(grams)) if grams else np.zeros(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.index)

    def check(self, view: TextView) -> str | None:
        if len(self.index) == 0:
            return None
        grams = view.ngrams(self.ngram)
        if len(grams) and np.isin(grams, self.index, assume_unique=False).any():
            return "eval_ngram_overlap"
        return None
