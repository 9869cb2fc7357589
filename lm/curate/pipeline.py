"""The Beam graph: read -> per-document chain -> exact dedup -> near dedup -> shards + stats.

The per-document work is one ParDo (chain.py). Both dedup stages need a global view and use
shuffles, so they scale past one machine: exact dedup groups documents by normalized-text hash
(GroupByKey); near dedup groups (band key, id) pairs by band key to find candidate pairs, finds
connected components with union-find over the (much smaller) set of pairs, and joins the
component roots back onto the documents with CoGroupByKey. Every removed document leaves through
a tagged `rejected` output, so kept + rejected always accounts for every input.
"""

from __future__ import annotations

import json
import time
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from lm.curate import output, report
from lm.curate.dedup import Decontaminator, bucket_pairs, connected_components, eval_texts
from lm.curate.sources import read_input


class ChainFn(beam.DoFn):
    """Runs the per-document chain; the processor (langid model etc.) is built once per worker."""

    def __init__(self, cfg: dict[str, Any], decontam_index):
        self.cfg = cfg
        self.decontam_index = decontam_index
        self.proc = None

    def setup(self):
        from lm.curate.chain import DocumentProcessor

        self.proc = DocumentProcessor(self.cfg, decontam_index=self.decontam_index)

    def process(self, doc):
        try:
            doc = self.proc.process(doc)
        except Exception as e:  # noqa: BLE001 - a bug on one document must not lose the run
            doc["trace"] = doc.get("trace") or []
            doc["rejected"] = ("error", f"internal_error:{type(e).__name__}")
            doc["detail"] = str(e)[:200]
            doc.pop("raw", None)
        if doc["rejected"]:
            yield beam.pvalue.TaggedOutput("rejected", doc)
        else:
            yield doc


def _size(doc: dict[str, Any]) -> int:
    return doc["trace"][-1][1] if doc["trace"] else 0


class ExactDedupFn(beam.DoFn):
    """Keeps the smallest id of each group of identical normalized texts."""

    def process(self, kv):
        _, docs = kv
        docs = sorted(docs, key=lambda d: d["id"])
        first = docs[0]
        first["trace"].append(("exact_dedup", _size(first)))
        yield first
        if len(docs) > 1:
            yield beam.pvalue.TaggedOutput("sizes", ("exact", len(docs)))
        for dup in docs[1:]:
            dup["rejected"] = ("exact_dedup", "exact_duplicate")
            dup["detail"] = f"duplicate_of:{first['id']}"
            yield beam.pvalue.TaggedOutput("rejected", dup)


class NearDedupFn(beam.DoFn):
    """Joins documents with their cluster root: only the root (smallest id) survives."""

    def process(self, kv):
        doc_id, grouped = kv
        roots = list(grouped["root"])
        for doc in grouped["doc"]:
            root = roots[0] if roots else doc_id
            if root != doc_id:
                doc["rejected"] = ("near_dedup", "near_duplicate")
                doc["detail"] = f"cluster_of:{root}"
                yield beam.pvalue.TaggedOutput("rejected", doc)
            else:
                doc["trace"].append(("near_dedup", _size(doc)))
                yield doc


def _components(pairs: list[tuple[str, str]]):
    return sorted(connected_components(pairs).items())


def _write_shard(kv, output_dir: str, kind: str, num_shards: int, text_chars: int):
    index, docs = kv
    docs = sorted(docs, key=lambda d: d["id"])
    path = output.shard_path(output_dir, kind, index, num_shards)
    if kind == "documents":
        output.write_documents(path, (output.kept_record(d) for d in docs))
    else:
        output.write_jsonl(path, (output.reject_record(d, text_chars) for d in docs))
    yield path[len(output_dir) + 1 :]


def _write_stats(stats, clusters, files, output_dir: str):
    shards = {"documents": sorted(f for f in files if not f.startswith(output.REJECTS_DIR))}
    shards["rejects"] = sorted(f for f in files if f.startswith(output.REJECTS_DIR))
    blob = json.dumps({"stats": stats, "clusters": clusters, "shards": shards})
    output.write_text(f"{output_dir}/_stats.json", blob)


def build(
    p: beam.Pipeline, cfg: dict[str, Any], inputs: list, output_dir: str, decontam_index=None
) -> None:
    """Adds the whole curation graph to `p`."""
    src, out, dd = cfg["source"], cfg["output"], cfg["dedup"]
    docs = (
        p
        | "Inputs" >> beam.Create(inputs)
        | "SpreadInputs" >> beam.Reshuffle()
        | "Read" >> beam.FlatMap(read_input, src)
    )
    chain = docs | "Chain" >> beam.ParDo(ChainFn(cfg, decontam_index)).with_outputs(
        "rejected", main="kept"
    )
    kept = chain.kept
    rejected = [chain.rejected]
    sizes = []
    if dd["exact"]:
        exact = (
            kept
            | "KeyByText" >> beam.Map(lambda d: (d["exact_key"], d))
            | "GroupByText" >> beam.GroupByKey()
            | "ExactDedup"
            >> beam.ParDo(ExactDedupFn()).with_outputs("rejected", "sizes", main="kept")
        )
        kept = exact.kept
        rejected.append(exact.rejected)
        sizes.append(exact.sizes)
    if dd["near"]:
        roots = (
            kept
            | "BandKeys" >> beam.FlatMap(lambda d: [(k, d["id"]) for k in d["band_keys"]])
            | "GroupByBand" >> beam.GroupByKey()
            | "CandidatePairs" >> beam.FlatMap(lambda kv: bucket_pairs(kv[1]))
            | "DistinctPairs" >> beam.Distinct()
            | "AllPairs" >> beam.combiners.ToList()
            | "UnionFind" >> beam.FlatMap(_components)
        )
        sizes.append(
            roots
            | "RootCounts" >> beam.Map(lambda kv: (kv[1], 1))
            | "ClusterSize" >> beam.CombinePerKey(sum)
            | "NearSize" >> beam.Map(lambda kv: ("near", kv[1]))
        )
        near = (
            {"doc": kept | "KeyById" >> beam.Map(lambda d: (d["id"], d)), "root": roots}
            | "JoinRoots" >> beam.CoGroupByKey()
            | "NearDedup" >> beam.ParDo(NearDedupFn()).with_outputs("rejected", main="kept")
        )
        kept = near.kept
        rejected.append(near.rejected)
    rejected = rejected | "AllRejected" >> beam.Flatten()
    n = out["num_shards"]
    files = []
    for kind, pcoll in (("documents", kept), ("rejects", rejected)):
        files.append(
            pcoll
            | f"Shard_{kind}" >> beam.Map(lambda d, n=n: (output.shard_of(d["id"], n), d))
            | f"Group_{kind}" >> beam.GroupByKey()
            | f"Write_{kind}"
            >> beam.FlatMap(_write_shard, output_dir, kind, n, out["reject_text_chars"])
        )
    files = files | "AllFiles" >> beam.Flatten() | "FileList" >> beam.combiners.ToList()
    summaries = [
        kept | "SummarizeKept" >> beam.Map(report.summarize),
        rejected | "SummarizeRejected" >> beam.Map(report.summarize),
    ]
    stats = (
        summaries
        | "AllSummaries" >> beam.Flatten()
        | "Stats" >> beam.CombineGlobally(report.StatsFn(out["examples_per_reason"]))
    )
    clusters = (
        (sizes or [p | "NoClusters" >> beam.Create([])])
        | "AllSizes" >> beam.Flatten()
        | "Clusters" >> beam.CombineGlobally(report.ClusterSizesFn())
    )
    _ = stats | "WriteStats" >> beam.Map(
        _write_stats,
        beam.pvalue.AsSingleton(clusters),
        beam.pvalue.AsSingleton(files),
        output_dir,
    )


def _local_runner(options: PipelineOptions):
    """The FnApiRunner for `--runner=DirectRunner`; None (the named runner) otherwise.

    Beam 2.77's DirectRunner first tries Prism, which downloads a Go binary at run time: that
    fails offline and costs a network timeout. The FnApiRunner is the DirectRunner's own batch
    engine and honours --direct_running_mode (in_memory, multi_threading, multi_processing).
    """
    from apache_beam.options.pipeline_options import StandardOptions

    if options.view_as(StandardOptions).runner not in ("DirectRunner", "SwitchingDirectRunner"):
        return None
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    return fn_runner.FnApiRunner()


def run(cfg: dict[str, Any], inputs: list, output_dir: str, beam_args: list[str]) -> dict:
    """Runs the pipeline to completion and returns the statistics the workers wrote."""
    options = PipelineOptions(beam_args)
    start = time.time()
    # Eval-set n-grams are gathered here, on the driver, so sets registered in this process
    # (register_eval_set) reach every worker inside the pickled DoFn.
    dd = cfg["decontam"]
    spec = dd["eval_sets"] if dd["enabled"] else ""
    index = Decontaminator(eval_texts(spec), dd["ngram"]).index
    with beam.Pipeline(runner=_local_runner(options), options=options) as p:
        build(p, cfg, inputs, output_dir, index)
    result = json.loads(output.read_text(f"{output_dir}/_stats.json"))
    result["seconds"] = round(time.time() - start, 2)
    result["decontam_ngrams"] = int(len(index))
    return result
