"""Run statistics (a Beam CombineFn, exact at any scale) and the rendered report.

Every document, kept or removed, is reduced to a small summary (its per-step sizes, where it
stopped and why, language, length); `StatsFn` merges those into counts. Those counts are not
what proves nothing was lost: `reconcile` checks them against two independent ones, the
readers' own read logs (`ReadTotalsFn`) and a join of every id read with every id written
(`ReconcileFn`), so a document dropped anywhere after the read is caught and named. Examples
of removed documents are the smallest ids per reason, so the report is the same under any
runner. The driver then writes `data_report.json`, `data_report.md` and PNG histograms next to
the data.
"""

from __future__ import annotations

import io
import json
from typing import Any

import apache_beam as beam

from lm.curate.chain import STEPS
from lm.curate.output import write_bytes, write_text

LENGTH_EDGES = [0] + [2**k for k in range(5, 21)]  # characters; last bin open-ended


def _length_bin(n: int) -> int:
    return 0 if n < 32 else min(n.bit_length() - 5, len(LENGTH_EDGES) - 1)


def summarize(doc: dict[str, Any], example_chars: int = 300) -> dict[str, Any]:
    """The few fields the statistics need (no full text crosses the combine)."""
    text = doc.get("text") or ""
    return {
        "id": doc["id"],
        "source": doc["source"],
        "bytes_in": doc.get("bytes_in", 0),
        "trace": list(doc.get("trace") or ()),
        "rejected": tuple(doc["rejected"]) if doc.get("rejected") else None,
        "language": doc.get("language", ""),
        "chars": len(text),
        "pii": dict(doc.get("pii") or {}),
        "example": text[:example_chars] if doc.get("rejected") else "",
    }


def _empty() -> dict[str, Any]:
    return {
        "inputs": [0, 0],
        "kept": [0, 0],
        "steps": {},
        "reasons": {},
        "languages_kept": {},
        "languages_all": {},
        "lengths_kept": [0] * len(LENGTH_EDGES),
        "lengths_rejected": [0] * len(LENGTH_EDGES),
        "pii": {},
        "sources": {},
        "examples": {},
    }


def _add(counter: dict, key: str, values) -> None:
    if isinstance(values, list):
        cur = counter.setdefault(key, [0] * len(values))
        for i, v in enumerate(values):
            cur[i] += v
    else:
        counter[key] = counter.get(key, 0) + values


class StatsFn(beam.CombineFn):
    """Merges document summaries into run statistics; `k` examples per removal reason."""

    def __init__(self, k: int = 3):
        self.k = k

    def create_accumulator(self) -> dict[str, Any]:
        return _empty()

    def add_input(self, acc: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
        acc["inputs"][0] += 1
        acc["inputs"][1] += s["bytes_in"]
        prev = s["bytes_in"]
        for step, size in s["trace"]:
            _add(acc["steps"], step, [1, prev, 1, size])
            prev = size
        if s["language"]:
            _add(acc["languages_all"], s["language"], 1)
        kept = s["rejected"] is None
        _add(acc["sources"], s["source"], [1, int(kept)])
        if kept:
            acc["kept"][0] += 1
            acc["kept"][1] += prev
            acc["lengths_kept"][_length_bin(s["chars"])] += 1
            if s["language"]:
                _add(acc["languages_kept"], s["language"], 1)
            for kind, n in s["pii"].items():
                _add(acc["pii"], kind, n)
        else:
            step, reason = s["rejected"]
            _add(acc["steps"], step, [1, prev, 0, 0])
            key = f"{step}/{reason}"
            _add(acc["reasons"], key, [1, prev])
            acc["lengths_rejected"][_length_bin(s["chars"])] += 1
            self._keep_example(acc["examples"], key, [s["id"], s["example"]])
        return acc

    def _keep_example(self, examples: dict, key: str, item: list) -> None:
        items = examples.setdefault(key, [])
        items.append(item)
        items.sort()
        del items[self.k :]

    def merge_accumulators(self, accumulators) -> dict[str, Any]:
        out = _empty()
        for acc in accumulators:
            for key in ("inputs", "kept", "lengths_kept", "lengths_rejected"):
                out[key] = [a + b for a, b in zip(out[key], acc[key])]
            for key in ("steps", "reasons", "languages_kept", "languages_all", "pii", "sources"):
                for k, v in acc[key].items():
                    _add(out[key], k, v)
            for k, items in acc["examples"].items():
                for item in items:
                    self._keep_example(out["examples"], k, item)
        return out

    def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
        return acc


class ClusterSizesFn(beam.CombineFn):
    """(kind, cluster size) pairs -> {kind: {size: number of clusters}}."""

    def create_accumulator(self) -> dict[str, dict[str, int]]:
        return {}

    def add_input(self, acc, item):
        kind, size = item
        _add(acc.setdefault(kind, {}), str(size), 1)
        return acc

    def merge_accumulators(self, accumulators):
        out: dict[str, dict[str, int]] = {}
        for acc in accumulators:
            for kind, sizes in acc.items():
                for size, n in sizes.items():
                    _add(out.setdefault(kind, {}), size, n)
        return out

    def extract_output(self, acc):
        return acc


class ReadTotalsFn(beam.CombineFn):
    """Sums the readers' read logs (sources.new_read_log): what was read, counted while reading."""

    _SUMS = ("lines", "blank_lines", "records", "bytes", "skipped_records", "duplicate_ids")

    def __init__(self, k: int = 5):
        self.k = k

    def create_accumulator(self) -> dict[str, Any]:
        return {"inputs": 0, **{key: 0 for key in self._SUMS}, "errors": {}, "failed": []}

    def add_input(self, acc, log):
        acc["inputs"] += 1
        for key in self._SUMS:
            acc[key] += log[key]
        if log["error"]:
            _add(acc["errors"], log["error"], 1)
            acc["failed"] = sorted(acc["failed"] + [[log["input"], log["error"]]])[: self.k]
        return acc

    def merge_accumulators(self, accumulators):
        out = self.create_accumulator()
        for acc in accumulators:
            out["inputs"] += acc["inputs"]
            for key in self._SUMS:
                out[key] += acc[key]
            for k, v in acc["errors"].items():
                _add(out["errors"], k, v)
            out["failed"] = sorted(out["failed"] + acc["failed"])[: self.k]
        return out

    def extract_output(self, acc):
        return acc


# An id is fine when it was read once and written once (kept or rejected); anything else is one
# of these problems.
PROBLEMS = ("missing", "unexpected", "read_twice", "written_twice")


class ReconcileFn(beam.CombineFn):
    """(id, (times read, times kept, times rejected)) -> totals, and per problem the count and
    the `k` smallest ids, so the report names them the same way under any runner."""

    def __init__(self, k: int = 5):
        self.k = k

    def create_accumulator(self) -> dict[str, Any]:
        return {"read": 0, "kept": 0, "rejected": 0, "problems": {p: [0, []] for p in PROBLEMS}}

    def _note(self, acc, problem: str, doc_id: str) -> None:
        entry = acc["problems"][problem]
        entry[0] += 1
        if len(entry[1]) < self.k or doc_id < entry[1][-1]:
            entry[1] = sorted(entry[1] + [doc_id])[: self.k]

    def add_input(self, acc, item):
        doc_id, (r, k, j) = item
        acc["read"] += r
        acc["kept"] += k
        acc["rejected"] += j
        if r == 0:
            self._note(acc, "unexpected", doc_id)
        elif k + j == 0:
            self._note(acc, "missing", doc_id)
        if r > 1:
            self._note(acc, "read_twice", doc_id)
        if k + j > 1:
            self._note(acc, "written_twice", doc_id)
        return acc

    def merge_accumulators(self, accumulators):
        out = self.create_accumulator()
        for acc in accumulators:
            for key in ("read", "kept", "rejected"):
                out[key] += acc[key]
            for p in PROBLEMS:
                n, ids = acc["problems"][p]
                out["problems"][p][0] += n
                out["problems"][p][1] = sorted(out["problems"][p][1] + ids)[: self.k]
        return out

    def extract_output(self, acc):
        return acc


def reconcile(stats: dict[str, Any], reads: dict[str, Any], ids: dict[str, Any]) -> dict:
    """The run's accounting, from three independent counts: what the readers counted while
    reading (`reads`), the ids read and written joined by id (`ids`), and the chain's per-document
    summaries (`stats`). `ok` only if all agree and no id is missing, extra or doubled."""
    checks = {
        "every_id_read_once_written_once": all(n == 0 for n, _ in ids["problems"].values()),
        "reader_counts_equal_ids_read": reads["records"] == ids["read"],
        "written_equal_read": ids["kept"] + ids["rejected"] == reads["records"],
        "summaries_agree": stats["inputs"][0] == reads["records"]
        and stats["kept"][0] == ids["kept"]
        and stats["inputs"][0] == stats["kept"][0] + sum(v[0] for v in stats["reasons"].values()),
    }
    return {"ok": all(checks.values()), "checks": checks, "read": reads, "ids": ids}


def mismatch_message(rec: dict[str, Any], output_dir: str) -> str:
    """One line saying what did not add up, for the DataError that fails the run."""
    ids, reads = rec["ids"], rec["read"]
    parts = [f"{p.replace('_', ' ')}: {n} (first: {', '.join(first)})"
             for p, (n, first) in ids["problems"].items() if n]  # fmt: skip
    if not parts:
        failed = [k for k, ok in rec["checks"].items() if not ok]
        parts = [f"failed checks {', '.join(failed)}"]
    return (
        f"reconciliation failed: {reads['records']:,} documents read, {ids['kept']:,} kept + "
        f"{ids['rejected']:,} rejected written; "
        + "; ".join(parts)
        + f"; see {output_dir}/data_report.md"
    )


def _plot(path: str, title: str, labels: list[str], series: dict[str, list[int]]) -> None:
    """A grouped bar chart written as PNG (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(labels)), 4))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(labels))], values, width=width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel("documents")
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def write_report(
    output_dir: str, stats: dict, clusters: dict, meta: dict, reconciliation: dict
) -> dict[str, Any]:
    """Writes data_report.json/.md and plots/*.png; returns the report. `reconciliation` is
    `reconcile(...)`'s result; the report is written whether or not it is ok."""
    report = {**meta, "reconciled": reconciliation["ok"], **stats, "clusters": clusters}
    report["reconciliation"] = reconciliation
    langs = sorted(report["languages_all"], key=lambda k: -report["languages_all"][k])[:25]
    _plot(
        f"{output_dir}/plots/languages.png",
        "Documents per language",
        langs,
        {
            "all classified": [report["languages_all"][k] for k in langs],
            "kept": [report["languages_kept"].get(k, 0) for k in langs],
        },
    )
    _plot(
        f"{output_dir}/plots/lengths.png",
        "Document length (characters, lower bin edge)",
        [str(e) for e in LENGTH_EDGES],
        {"kept": report["lengths_kept"], "removed": report["lengths_rejected"]},
    )
    write_text(f"{output_dir}/data_report.json", json.dumps(report, indent=1, ensure_ascii=False))
    write_text(f"{output_dir}/data_report.md", render_markdown(report))
    return report


def _pct(a: float, b: float) -> str:
    return f"{100.0 * a / b:.1f}%" if b else "-"


def _reconciliation_lines(rec: dict[str, Any]) -> list[str]:
    reads, ids = rec["read"], rec["ids"]
    lines = [
        "## Reconciliation",
        "",
        f"- read (counted by the readers): {reads['inputs']:,} inputs, {reads['records']:,} "
        f"documents, {reads['lines']:,} lines/rows/records ({reads['blank_lines']:,} blank, "
        f"{reads['skipped_records']:,} non-document WARC records), {reads['bytes']:,} bytes",
        f"- written (counted by the shard writers): {ids['kept']:,} kept + {ids['rejected']:,} "
        f"rejected = {ids['kept'] + ids['rejected']:,}",
        f"- repeated input ids made unique: {reads['duplicate_ids']:,}",
    ]
    for reason, n in sorted(reads["errors"].items()):
        lines.append(f"- inputs not read to the end, {reason}: {n:,}")
    for problem, (n, first) in ids["problems"].items():
        if n:
            lines.append(f"- **{problem}: {n:,}** (first: {', '.join(f'`{i}`' for i in first)})")
    lines += [f"- check {k}: {'ok' if ok else '**FAILED**'}" for k, ok in rec["checks"].items()]
    return lines + [""]


def render_markdown(r: dict[str, Any]) -> str:
    """The human-readable report."""
    n_in, b_in = r["inputs"]
    n_out, b_out = r["kept"]
    lines = [
        f"# Data report: {r.get('pipeline', '')}",
        "",
        f"{r.get('description', '')}",
        "",
        f"- documents: {n_in:,} in, {n_out:,} kept ({_pct(n_out, n_in)})",
        f"- bytes: {b_in:,} in, {b_out:,} kept ({_pct(b_out, b_in)})",
        f"- reconciled (read = kept + removed, by id): **{r['reconciled']}**",
        f"- config hash: `{r.get('config_hash', '')}`; runner: {r.get('runner', '')}",
        "",
        *_reconciliation_lines(r["reconciliation"]),
        "## Per step",
        "",
        "| step | docs in | docs out | removed | bytes in | bytes out |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for step in STEPS:
        if step in r["steps"]:
            din, bin_, dout, bout = r["steps"][step]
            lines.append(f"| {step} | {din:,} | {dout:,} | {din - dout:,} | {bin_:,} | {bout:,} |")
    lines += ["", "## Removal reasons", "", "| step/reason | docs | bytes |", "|---|---:|---:|"]
    for key, (n, b) in sorted(r["reasons"].items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {key} | {n:,} | {b:,} |")
    lines += ["", "## Languages (kept)", ""]
    for lang, n in sorted(r["languages_kept"].items(), key=lambda kv: -kv[1]):
        lines.append(f"- {lang}: {n:,}")
    lines += ["", "![languages](plots/languages.png)", "", "![lengths](plots/lengths.png)", ""]
    lines += ["## PII replaced (kept documents)", ""]
    lines += [f"- {k}: {n:,}" for k, n in sorted(r["pii"].items())] or ["- none"]
    lines += ["", "## Duplicate clusters (size: clusters)", ""]
    for kind, sizes in sorted(r["clusters"].items()):
        pairs = sorted(sizes.items(), key=lambda kv: int(kv[0]))
        lines.append(f"- {kind}: " + ", ".join(f"{s}: {n}" for s, n in pairs))
    if not r["clusters"]:
        lines.append("- none")
    lines += ["", "## Examples of removed documents", ""]
    for key, items in sorted(r["examples"].items()):
        lines.append(f"### {key}")
        for doc_id, text in items:
            snippet = " ".join(text.split())[:200].replace("`", "'")
            lines.append(f"- `{doc_id}`: {snippet}")
        lines.append("")
    return "\n".join(lines) + "\n"
