"""The Beam graph: read -> per-document chain -> exact dedup -> near dedup -> shards + stats.

The per-document work is one ParDo (chain.py). Both dedup stages (dedup_stages.py) need a global
view and use shuffles of ids only, so no worker holds all texts of a key or all candidate pairs:
exact dedup groups (text hash, id) pairs and joins the decision back by id; near dedup finds
connected components of the MinHash candidate pairs by large-star / small-star rounds (Kiveris et
al. 2014), checked for convergence, and joins the component roots back onto the documents. Every
removed document leaves through a tagged `rejected` output.

Nothing is taken on trust: the read step emits each input's read log (what the reader counted as
it read) and every document id it produced; the shard writers emit every id they wrote. A join by
id (`Reconcile`) finds any document read but never written, written twice, or written without
being read, and the driver fails the run if there is one (report.reconcile). Shards are written
streaming (output.ShardWriter): a worker never holds a whole shard.
"""

from __future__ import annotations

import json
import time
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from lm.curate import output, report
from lm.curate.dedup import Decontaminator, eval_texts
from lm.curate.dedup_stages import ExactDedup, NearDedup
from lm.curate.sources import new_read_log, read_input


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


class ReadFn(beam.DoFn):
    """Reads one input. Its documents go on; its read log leaves through the tagged `read_log`
    output, counted by the reader itself rather than summed from the chain's summaries."""

    def __init__(self, src: dict[str, Any]):
        self.src = src

    def process(self, item):
        log = new_read_log(item[1])
        yield from read_input(item, self.src, log)
        yield beam.pvalue.TaggedOutput("read_log", log)


class WriteShardFn(beam.DoFn):
    """Streams one shard's documents to its file as they arrive (no sort, no list: memory does not
    grow with the shard), emitting each written id on the tagged `written` output and, once the
    file is in place, its name relative to the output directory."""

    def __init__(self, output_dir: str, kind: str, num_shards: int, text_chars: int):
        self.output_dir, self.kind = output_dir, kind
        self.num_shards, self.text_chars = num_shards, text_chars

    def process(self, kv):
        index, docs = kv
        path = output.shard_path(self.output_dir, self.kind, index, self.num_shards)
        writer = output.ShardWriter(path, self.kind)
        try:
            for d in docs:
                if self.kind == "documents":
                    writer.write(output.kept_record(d))
                else:
                    writer.write(output.reject_record(d, self.text_chars))
                yield beam.pvalue.TaggedOutput("written", (d["id"], self.kind))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        yield path[len(self.output_dir) + 1 :]


def _sum_counts(values) -> tuple[int, int, int]:
    """(times read, times written as kept, times written as rejected) of one id."""
    r = k = j = 0
    for a, b, c in values:
        r, k, j = r + a, k + b, j + c
    return r, k, j


def _write_stats(stats, clusters, files, reads, ids, output_dir: str):
    shards = {"documents": sorted(f for f in files if not f.startswith(output.REJECTS_DIR))}
    shards["rejects"] = sorted(f for f in files if f.startswith(output.REJECTS_DIR))
    blob = json.dumps(
        {"stats": stats, "clusters": clusters, "shards": shards, "read": reads, "ids": ids}
    )
    output.write_text(f"{output_dir}/_stats.json", blob)


def build(
    p: beam.Pipeline, cfg: dict[str, Any], inputs: list, output_dir: str, decontam_index=None
) -> None:
    """Adds the whole curation graph to `p`."""
    src, out, dd = cfg["source"], cfg["output"], cfg["dedup"]
    read = (
        p
        | "Inputs" >> beam.Create(inputs)
        | "SpreadInputs" >> beam.Reshuffle()
        | "Read" >> beam.ParDo(ReadFn(src)).with_outputs("read_log", main="docs")
    )
    docs = read.docs
    counted = [docs | "ReadIds" >> beam.Map(lambda d: (d["id"], (1, 0, 0)))]
    chain = docs | "Chain" >> beam.ParDo(ChainFn(cfg, decontam_index)).with_outputs(
        "rejected", main="kept"
    )
    kept = chain.kept
    rejected = [chain.rejected]
    sizes = []
    if dd["exact"]:
        exact = kept | "ExactDedup" >> ExactDedup()
        kept = exact["kept"]
        rejected.append(exact["rejected"])
        sizes.append(exact["sizes"])
    if dd["near"]:
        near = kept | "NearDedup" >> NearDedup(
            rounds=dd["cc_rounds"], setting="--config.dedup.cc_rounds"
        )
        kept = near["kept"]
        rejected.append(near["rejected"])
        sizes.append(near["sizes"])
    rejected = rejected | "AllRejected" >> beam.Flatten()
    n = out["num_shards"]
    files = []
    for kind, pcoll, flag in (("documents", kept, (0, 1, 0)), ("rejects", rejected, (0, 0, 1))):
        written = (
            pcoll
            | f"Shard_{kind}" >> beam.Map(lambda d, n=n: (output.shard_of(d["id"], n), d))
            | f"Group_{kind}" >> beam.GroupByKey()
            | f"Write_{kind}"
            >> beam.ParDo(WriteShardFn(output_dir, kind, n, out["reject_text_chars"])).with_outputs(
                "written", main="files"
            )
        )
        files.append(written.files)
        counted.append(
            written.written | f"WrittenIds_{kind}" >> beam.Map(lambda kv, f=flag: (kv[0], f))
        )
    files = files | "AllFiles" >> beam.Flatten() | "FileList" >> beam.combiners.ToList()
    ids = (
        counted
        | "AllIds" >> beam.Flatten()
        | "CountPerId" >> beam.CombinePerKey(_sum_counts)
        | "Reconcile" >> beam.CombineGlobally(report.ReconcileFn())
    )
    reads = read.read_log | "ReadTotals" >> beam.CombineGlobally(report.ReadTotalsFn())
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
        beam.pvalue.AsSingleton(reads),
        beam.pvalue.AsSingleton(ids),
        output_dir,
    )


def _local_runner(options: PipelineOptions):
    """The runner object for `--runner=DirectRunner` and `--runner=DaskRunner`; None (Beam
    resolves the named runner: Dataflow, Flink, Spark ...) otherwise.

    Beam 2.77's DirectRunner first tries Prism, which downloads a Go binary at run time: that
    fails offline and costs a network timeout. The FnApiRunner is the DirectRunner's own batch
    engine and honours --direct_running_mode (in_memory, multi_threading, multi_processing).
    Beam's DaskRunner mixes a multi-output ParDo's outputs and recomputes side inputs inside
    tasks; lm/curate/dask_runner.py is it with those fixed.
    """
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner
    if runner in ("DaskRunner", "apache_beam.runners.dask.dask_runner.DaskRunner"):
        from lm.curate.dask_runner import DaskRunner

        return DaskRunner()
    if runner not in ("DirectRunner", "SwitchingDirectRunner"):
        return None
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    return fn_runner.FnApiRunner()


def run(cfg: dict[str, Any], inputs: list, output_dir: str, beam_args: list[str]) -> dict:
    """Runs the pipeline to completion and returns the statistics the workers wrote.

    Prints one progress line when the pipeline starts and one when it ends (stderr); what the
    runner itself logs is the CLI's business (`--verbose`)."""
    import sys

    from apache_beam.options.pipeline_options import StandardOptions

    options = PipelineOptions(beam_args)
    start = time.time()
    # Eval-set n-grams are gathered here, on the driver, so sets registered in this process
    # (register_eval_set) reach every worker inside the pickled DoFn.
    dd = cfg["decontam"]
    spec = dd["eval_sets"] if dd["enabled"] else ""
    index = Decontaminator(eval_texts(spec), dd["ngram"]).index
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    print(
        f"lm data: curating {len(inputs):,} {cfg['source']['type']} inputs on {runner}",
        file=sys.stderr,
        flush=True,
    )
    with beam.Pipeline(runner=_local_runner(options), options=options) as p:
        build(p, cfg, inputs, output_dir, index)
    result = json.loads(output.read_text(f"{output_dir}/_stats.json"))
    result["seconds"] = round(time.time() - start, 2)
    result["decontam_ngrams"] = int(len(index))
    print(
        f"lm data: pipeline finished in {result['seconds']:.1f}s; writing the report",
        file=sys.stderr,
        flush=True,
    )
    return result
