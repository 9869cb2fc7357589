"""Exact and near dedup as composite Beam transforms in which no worker holds a whole data set.

Both transforms take the chain's kept documents (dicts with "id", "exact_key", "band_keys",
"trace") and return {"kept", "rejected", "sizes"}: kept documents (with a trace entry appended),
removed documents (doc["rejected"] = (stage, reason), doc["detail"]) and (kind, cluster size)
records for report.ClusterSizesFn. Ids are assumed unique: every join here is keyed by id.

- ExactDedup shuffles only (exact_key, id) pairs to choose the smallest id of each key, then
  joins that decision back onto the documents by id, so a text is shuffled once, alone, and
  no worker holds all texts of a key (one GroupByKey of whole documents did).
- NearDedup finds candidate pairs per LSH bucket and their connected components with
  ConnectedComponents: large-star/small-star rounds, each a shuffle of edges, instead of
  collecting every pair on one worker for union-find.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam

from lm.curate.dedup import large_star, small_star

# Alternations of large-star and small-star unrolled into the graph. A path of n nodes labelled
# in order needs ceil(log2(n - 1)) (each large-star doubles the stride): 30 covers ~1e9 nodes.
# That was the slowest case measured (300k nodes: 19 in order, 14 shuffled); LSH candidate
# graphs are unions of bucket stars and converge in a handful. An unused round costs two
# shuffles of the (already converged, id-only) edges.
DEFAULT_ROUNDS = 30


class ComponentsNotConverged(RuntimeError):
    """Labels still differ across an input pair after the unrolled rounds."""


def _size(doc: dict[str, Any]) -> int:
    return doc["trace"][-1][1] if doc["trace"] else 0


def _orient(pair: tuple[str, str]) -> tuple[str, str]:
    a, b = pair
    return (a, b) if a > b else (b, a)


def _both_ways(edge: tuple[str, str]) -> list[tuple[str, str]]:
    return [(edge[0], edge[1]), (edge[1], edge[0])]


def _label_candidates(edge: tuple[str, str]) -> list[tuple[str, str]]:
    """An edge (larger, smaller) offers `smaller` as label to both ends: label = min(N[v])."""
    return [(edge[0], edge[1]), (edge[1], edge[1])]


def _send_label(kv) -> Iterator[tuple[str, str]]:
    """At node a: tells every input-pair neighbour b the label of a."""
    node, grouped = kv
    label = next(iter(grouped["label"]), node)
    for other in grouped["nbr"]:
        yield other, label


class _CheckLabelsFn(beam.DoFn):
    """At node b: every input-pair neighbour must carry b's label, else the rounds were too few.

    Labels never exceed their node and never leave its component, so a label that is constant
    across every input pair is the component's smallest id: exactly union-find's answer. A
    mismatch means one more round of min-label propagation would still change a label."""

    def __init__(self, rounds: int, setting: str):
        self.rounds, self.setting = rounds, setting

    def process(self, kv):
        node, grouped = kv
        label = next(iter(grouped["label"]), node)
        for peer in grouped["peer"]:
            if peer != label:
                raise ComponentsNotConverged(
                    f"near-dedup connected components did not converge in rounds={self.rounds}: "
                    f"{node!r} is labelled {label!r} but a neighbour is labelled {peer!r}; "
                    f"raise {self.setting}"
                )
        yield node, label


class ConnectedComponents(beam.PTransform):
    """(a, b) pairs -> (id, smallest id of its component) for every id in some pair.

    Alternating large-star and small-star (Kiveris et al. 2014, "Connected Components in
    MapReduce and Beyond"), each one GroupByKey of edges; the paper proves O(log^2 n)
    alternations suffice. A Beam graph is static, so `rounds` alternations are unrolled and a
    final stage verifies the labels against the input pairs: it fails the pipeline with
    ComponentsNotConverged, naming `setting`, rather than emit a wrong clustering. The edge
    count never grows beyond the input's plus one per node; the largest group a worker holds is
    one node's neighbour ids (at the end, a component's ids at its root), never all pairs.
    """

    def __init__(self, rounds: int = DEFAULT_ROUNDS, setting: str = "the rounds setting"):
        super().__init__()
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self.rounds, self.setting = rounds, setting

    def expand(self, pairs):
        edges = pairs | "Orient" >> beam.Map(_orient)
        for r in range(self.rounds):
            edges = (
                edges
                | f"LargeStarSend{r}" >> beam.FlatMap(_both_ways)
                | f"LargeStarGroup{r}" >> beam.GroupByKey()
                | f"LargeStar{r}" >> beam.FlatMapTuple(large_star)
                # Edges are (larger, smaller): keyed by the larger end, which small-star needs.
                | f"SmallStarGroup{r}" >> beam.GroupByKey()
                | f"SmallStar{r}" >> beam.FlatMapTuple(small_star)
            )
        labels = (
            edges
            | "LabelCandidates" >> beam.FlatMap(_label_candidates)
            | "Label" >> beam.CombinePerKey(min)
        )
        neighbours = pairs | "InputBothWays" >> beam.FlatMap(_both_ways)
        sent = (
            {"label": labels, "nbr": neighbours}
            | "JoinLabelToPairs" >> beam.CoGroupByKey()
            | "SendLabel" >> beam.FlatMap(_send_label)
        )
        return (
            {"label": labels, "peer": sent}
            | "JoinNeighbourLabels" >> beam.CoGroupByKey()
            | "CheckLabels" >> beam.ParDo(_CheckLabelsFn(self.rounds, self.setting))
        )


def _min_count(values: Iterable[str]) -> tuple[str, int]:
    """Smallest value and count in one pass (a group's values are streamed, not copied)."""
    low, n = None, 0
    for v in values:
        n += 1
        if low is None or v < low:
            low = v
    return low, n


def _same_count(first: int, second: int) -> None:
    """Grouped values are re-iterable in Beam; fail loudly rather than drop a second pass."""
    if first != second:
        raise RuntimeError(f"grouped values changed between passes ({first} then {second})")


def _around_min(ids) -> Iterator[tuple[str, str]]:
    """(smallest id, other id) for every other id of one group: two passes over the grouped
    ids (Beam lets a DoFn iterate them more than once), no sorted copy."""
    low, n = _min_count(ids)
    seen = 0
    for other in ids:
        seen += 1
        if other != low:
            yield low, other
    _same_count(n, seen)


def _star_pairs(kv) -> Iterator[tuple[str, str]]:
    """One LSH bucket as a star around its smallest id (dedup.bucket_pairs without the copy)."""
    return _around_min(kv[1])


def _band_keys(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k, doc["id"]) for k in doc["band_keys"]]


def _by_id(doc: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return doc["id"], doc


class _NearDecideFn(beam.DoFn):
    """Joins a document with its cluster root: only the root (smallest id) survives."""

    def process(self, kv):
        doc_id, grouped = kv
        root = next(iter(grouped["root"]), doc_id)
        for doc in grouped["doc"]:
            if root != doc_id:
                doc["rejected"] = ("near_dedup", "near_duplicate")
                doc["detail"] = f"cluster_of:{root}"
                yield beam.pvalue.TaggedOutput("rejected", doc)
            else:
                doc["trace"].append(("near_dedup", _size(doc)))
                yield doc


class NearDedup(beam.PTransform):
    """Docs -> {"kept", "rejected", "sizes"}: one survivor (the smallest id) per connected
    component of LSH candidate pairs; ("near", size) per component of two or more."""

    def __init__(self, rounds: int = DEFAULT_ROUNDS, setting: str = "the rounds setting"):
        super().__init__()
        self.rounds, self.setting = rounds, setting

    def expand(self, docs):
        pairs = (
            docs
            | "BandKeys" >> beam.FlatMap(_band_keys)
            | "GroupByBand" >> beam.GroupByKey()
            | "CandidatePairs" >> beam.FlatMap(_star_pairs)
            | "DistinctPairs" >> beam.Distinct()
        )
        roots = pairs | "Components" >> ConnectedComponents(self.rounds, self.setting)
        sizes = (
            roots
            | "RootCounts" >> beam.Map(lambda kv: (kv[1], 1))
            | "ClusterSize" >> beam.CombinePerKey(sum)
            | "NearSize" >> beam.Map(lambda kv: ("near", kv[1]))
        )
        near = (
            {"doc": docs | "KeyById" >> beam.Map(_by_id), "root": roots}
            | "JoinRoots" >> beam.CoGroupByKey()
            | "Decide" >> beam.ParDo(_NearDecideFn()).with_outputs("rejected", main="kept")
        )
        return {"kept": near.kept, "rejected": near.rejected, "sizes": sizes}


def _keeper(kv) -> Iterator[Any]:
    """All ids of one exact key -> (id, keeper) for each duplicate, plus ("exact", n) on the
    sizes output. Two passes over the grouped ids; none is copied."""
    n = 1
    for keeper, doc_id in _around_min(kv[1]):
        n += 1
        yield doc_id, keeper
    if n > 1:
        yield beam.pvalue.TaggedOutput("sizes", ("exact", n))


def _exact_decide(kv) -> Iterator[Any]:
    """Joins a document with its keeper, if it has one (then it is a duplicate)."""
    _, grouped = kv
    keepers: Iterable[str] = grouped["keeper"]
    keeper = next(iter(keepers), None)
    for doc in grouped["doc"]:
        if keeper is None:
            doc["trace"].append(("exact_dedup", _size(doc)))
            yield doc
        else:
            doc["rejected"] = ("exact_dedup", "exact_duplicate")
            doc["detail"] = f"duplicate_of:{keeper}"
            yield beam.pvalue.TaggedOutput("rejected", doc)


class ExactDedup(beam.PTransform):
    """Docs -> {"kept", "rejected", "sizes"}: the smallest id of each exact key survives;
    ("exact", n) per key shared by n >= 2 documents."""

    def expand(self, docs):
        keepers = (
            docs
            | "KeyIdByText" >> beam.Map(lambda d: (d["exact_key"], d["id"]))
            | "GroupIdsByText" >> beam.GroupByKey()
            | "Keeper" >> beam.FlatMap(_keeper).with_outputs("sizes", main="duplicates")
        )
        exact = (
            {"doc": docs | "KeyById" >> beam.Map(_by_id), "keeper": keepers.duplicates}
            | "JoinKeeper" >> beam.CoGroupByKey()
            | "Decide" >> beam.FlatMap(_exact_decide).with_outputs("rejected", main="kept")
        )
        return {"kept": exact.kept, "rejected": exact.rejected, "sizes": keepers.sizes}
