"""Dedup stages run through a real Beam pipeline (FnApiRunner), checked against independent
in-memory references: a breadth-first search for components, hand-derived round counts, and a
dictionary-based exact + near dedup."""

import itertools
import random
from collections import Counter, defaultdict

import apache_beam as beam
import pytest
from apache_beam.runners.portability.fn_api_runner import fn_runner

from lm.curate.dedup import MinHasher, connected_components, exact_key, large_star, small_star
from lm.curate.dedup_stages import (
    ComponentsNotConverged,
    ConnectedComponents,
    ExactDedup,
    NearDedup,
)
from lm.curate.textstats import TextView

# Results leave the pipeline through this dict: the FnApiRunner runs in this process.
_RESULTS: dict[str, list] = {}


def _store(items, name):
    _RESULTS[name] = items


def _collect(pcoll, name: str) -> None:
    items = pcoll | f"List_{name}" >> beam.combiners.ToList()
    _ = items | f"Store_{name}" >> beam.Map(_store, name)


def _pipeline() -> beam.Pipeline:
    return beam.Pipeline(runner=fn_runner.FnApiRunner())


def _bfs_roots(pairs) -> dict[str, str]:
    """Reference: node -> smallest node of its component, by breadth-first search."""
    adj: dict[str, set[str]] = defaultdict(set)
    for a, b in pairs:
        adj[a].add(b)
        adj[b].add(a)
    roots: dict[str, str] = {}
    for start in adj:
        if start in roots:
            continue
        comp, frontier = {start}, [start]
        while frontier:
            frontier = [w for v in frontier for w in adj[v] if w not in comp]
            comp.update(frontier)
        for v in comp:
            roots[v] = min(comp)
    return roots


def _run_components(pairs, rounds=None, setting="the rounds setting") -> list:
    kwargs = {} if rounds is None else {"rounds": rounds}
    with _pipeline() as p:
        roots = p | beam.Create(pairs) | ConnectedComponents(setting=setting, **kwargs)
        _collect(roots, "roots")
    return _RESULTS.pop("roots")


def _path(prefix: str, labels: list[str]) -> list[tuple[str, str]]:
    return [(f"{prefix}{a}", f"{prefix}{b}") for a, b in zip(labels, labels[1:])]


def test_star_steps_by_hand():
    # Node c with neighbours b, d, e: the larger ones (d, e) move to the smallest (b).
    assert sorted(large_star("c", ["d", "b", "e", "d"])) == [("d", "b"), ("e", "b")]
    assert list(large_star("a", ["b"])) == [("b", "a")]
    assert list(large_star("z", ["a", "b"])) == []
    # Node e with smaller neighbours c, b: both end up on b (no self-loop b-b).
    assert sorted(small_star("e", ["c", "b", "c"])) == [("c", "b"), ("e", "b")]


def _graphs() -> list[tuple[str, str]]:
    rng = random.Random(7)
    pairs = []
    n = 300
    pairs += _path("sorted:", [f"{i:04d}" for i in range(n)])
    shuffled = [f"{i:04d}" for i in range(500)]
    rng.shuffle(shuffled)
    pairs += _path("shuffled:", shuffled)
    # Labels alternate between the two ends: 0, 199, 1, 198, ...
    zigzag = [f"{(k // 2) if k % 2 == 0 else 199 - k // 2:04d}" for k in range(200)]
    pairs += _path("zigzag:", zigzag)
    pairs += [("star:050", f"star:{i:03d}") for i in range(101) if i != 50]
    clique = [f"clique:{i}" for i in range(12)]
    pairs += list(itertools.combinations(clique, 2))
    cycle = [f"{i:02d}" for i in range(64)]
    rng.shuffle(cycle)
    pairs += _path("cycle:", cycle + cycle[:1])
    pairs += [("piece:a", "piece:b"), ("piece:c", "piece:d"), ("piece:d", "piece:e")]
    pairs += [("self:x", "self:x"), ("self:y", "self:z"), ("self:z", "self:z")]
    # Random sparse graph; unpadded ids so string order differs from numeric order.
    pairs += [(f"rand:{rng.randrange(400)}", f"rand:{rng.randrange(400)}") for _ in range(300)]
    # Repeats and reversed orientations must not matter.
    pairs += [(b, a) for a, b in rng.sample(pairs, 50)]
    rng.shuffle(pairs)
    return pairs


def test_components_equal_union_find_on_hard_graphs():
    pairs = _graphs()
    reference = _bfs_roots(pairs)
    assert connected_components(pairs) == reference  # the in-memory union-find agrees
    assert reference["sorted:0299"] == "sorted:0000" and reference["star:100"] == "star:000"
    result = _run_components(pairs)
    assert len(result) == len(dict(result))  # one label per node
    assert dict(result) == reference


def test_rounds_needed_for_a_sorted_path_match_the_hand_count():
    # A path 0-1-...-64 labelled in order: after r rounds node k > 2**r is linked to k - 2**r
    # (each large-star doubles the stride), so it converges exactly when 2**r >= 64: r = 6.
    pairs = _path("", [f"{i:02d}" for i in range(65)])
    expected = {f"{i:02d}": "00" for i in range(65)}
    assert dict(_run_components(pairs, rounds=6)) == expected
    with pytest.raises(ComponentsNotConverged, match="rounds=5") as failure:
        _run_components(pairs, rounds=5, setting="--config.dedup.cc_rounds")
    assert "did not converge" in str(failure.value)
    assert "--config.dedup.cc_rounds" in str(failure.value)


def _words(rng: random.Random, vocab: list[str], n: int) -> list[str]:
    return [rng.choice(vocab) for _ in range(n)]


def _edit(words: list[str], positions: list[int]) -> list[str]:
    out = list(words)
    for i in positions:
        out[i] = f"edited{i}"
    return out


def _corpus() -> dict[str, str]:
    """id -> text, with exact groups, near clusters, a chain, a cross case and singletons."""
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(3000)]
    base = [_words(rng, vocab, 200) for _ in range(6)]
    t = {}
    # Exact group of three (case, spacing, punctuation); the keeper is doc03.
    t["doc07"] = " ".join(base[0])
    t["doc03"] = "  ".join(base[0]).upper()
    t["doc11"] = ", ".join(base[0]) + "!"
    # Near chain: each differs from the previous by one word.
    t["doc30"] = " ".join(base[1])
    t["doc21"] = " ".join(_edit(base[1], [50]))
    t["doc42"] = " ".join(_edit(base[1], [50, 150]))
    # Near star around a larger id; doc01 is an exact copy of doc20, so doc20 goes at the exact
    # stage and doc01 becomes the near root.
    t["doc20"] = " ".join(base[2])
    t["doc01"] = " ".join(base[2]).title()
    for k, pos in enumerate([10, 60, 110, 160]):
        t[f"doc5{k}"] = " ".join(_edit(base[2], [pos]))
    # Too short for a shingle (no band keys): only exact dedup applies.
    t["doc60"] = "hi there"
    t["doc61"] = "Hi, there!"
    t["doc62"] = "hello"
    t["doc70"] = " ".join(base[3])
    t["doc71"] = " ".join(base[4])
    return t


def _docs(texts: dict[str, str]) -> list[dict]:
    """Documents as the chain leaves them (chain.DocumentProcessor's last steps)."""
    hasher = MinHasher()
    docs = []
    for doc_id, text in texts.items():
        view = TextView(text)
        sig = hasher.signature(view)
        docs.append(
            {
                "id": doc_id,
                "text": text,
                "trace": [("decode", len(text.encode("utf-8")))],
                "rejected": None,
                "exact_key": exact_key(view),
                "band_keys": hasher.band_keys(sig) if sig is not None else [],
            }
        )
    return docs


def _reference(docs: list[dict]):
    """Straightforward dedup in memory: dict of exact keys, then all pairs per bucket + BFS."""
    groups = defaultdict(list)
    for d in docs:
        groups[d["exact_key"]].append(d["id"])
    rejected, sizes, survivors = {}, Counter(), set()
    for ids in groups.values():
        keeper = min(ids)
        survivors.add(keeper)
        if len(ids) > 1:
            sizes["exact", len(ids)] += 1
        for i in ids:
            if i != keeper:
                rejected[i] = ("exact_dedup", "exact_duplicate", f"duplicate_of:{keeper}")
    buckets = defaultdict(set)
    for d in docs:
        if d["id"] in survivors:
            for key in d["band_keys"]:
                buckets[key].add(d["id"])
    pairs = [p for m in buckets.values() for p in itertools.combinations(sorted(m), 2)]
    roots = _bfs_roots(pairs)
    for n in Counter(roots.values()).values():
        sizes["near", n] += 1
    for i, root in roots.items():
        if i != root:
            rejected[i] = ("near_dedup", "near_duplicate", f"cluster_of:{root}")
    kept = {d["id"] for d in docs} - set(rejected)
    return kept, rejected, sizes


def test_exact_then_near_match_the_in_memory_reference():
    docs = _docs(_corpus())
    kept_ref, rejected_ref, sizes_ref = _reference(docs)
    # The reference finds the clusters the corpus was built with.
    assert kept_ref == {"doc03", "doc21", "doc01", "doc60", "doc62", "doc70", "doc71"}
    assert rejected_ref["doc20"] == ("exact_dedup", "exact_duplicate", "duplicate_of:doc01")
    assert rejected_ref["doc53"] == ("near_dedup", "near_duplicate", "cluster_of:doc01")
    assert rejected_ref["doc42"] == ("near_dedup", "near_duplicate", "cluster_of:doc21")
    assert sizes_ref == {("exact", 3): 1, ("exact", 2): 2, ("near", 3): 1, ("near", 5): 1}

    shuffled = list(docs)
    random.Random(0).shuffle(shuffled)
    with _pipeline() as p:
        exact = p | beam.Create(shuffled) | "Exact" >> ExactDedup()
        near = exact["kept"] | "Near" >> NearDedup()
        rejected = (exact["rejected"], near["rejected"]) | "Rejected" >> beam.Flatten()
        sizes = (exact["sizes"], near["sizes"]) | "Sizes" >> beam.Flatten()
        _collect(near["kept"], "kept")
        _collect(rejected, "rejected")
        _collect(sizes, "sizes")
    kept, rej, sz = _RESULTS.pop("kept"), _RESULTS.pop("rejected"), _RESULTS.pop("sizes")

    assert sorted(d["id"] for d in kept) == sorted(kept_ref)
    assert len(rej) == len(rejected_ref)
    assert {d["id"]: (*d["rejected"], d["detail"]) for d in rej} == rejected_ref
    assert Counter(sz) == sizes_ref
    for d in kept:
        n = len(d["text"].encode("utf-8"))
        assert d["trace"] == [("decode", n), ("exact_dedup", n), ("near_dedup", n)]
    assert all(d["text"] for d in kept + rej)  # documents arrive whole after the joins


def test_exact_dedup_alone_with_no_duplicates_reports_no_sizes():
    docs = _docs({"b": "one two three", "a": "four five six", "c": "seven"})
    with _pipeline() as p:
        out = p | beam.Create(docs) | ExactDedup()
        _collect(out["kept"], "kept")
        _collect(out["rejected"], "rejected")
        _collect(out["sizes"], "sizes")
    assert sorted(d["id"] for d in _RESULTS.pop("kept")) == ["a", "b", "c"]
    assert _RESULTS.pop("rejected") == [] and _RESULTS.pop("sizes") == []
