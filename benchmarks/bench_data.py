"""Data-curation throughput: documents per second per core on ~4 KB documents.

Two numbers, because they answer different questions:
- `chain_*`: the per-document functions alone (decode, clean, langid on a 1,000-character
  prefix, every quality filter, blocklist, PII, exact key and MinHash signature), called
  directly in one process: the cost that scales with the corpus on any runner.
- `beam_*`: the end-to-end Beam run (DirectRunner, in-memory, one process) over the same
  documents as files, including reading, both dedup shuffles, shard writing and the report:
  what a local run costs, dominated at small sizes by Beam's fixed and per-element overheads.

    .venv/bin/python benchmarks/bench_data.py [--num_docs=2000]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lm.curate.chain import DocumentProcessor  # noqa: E402
from lm.curate.config import default_config  # noqa: E402
from lm.curate.synthetic import code, prose  # noqa: E402


def _documents(num_docs: int, code_fraction: float = 0.2) -> list[dict]:
    """~4 KB documents: prose (about 700 words) and Python modules, seeded."""
    rng = random.Random(0)
    docs = []
    for i in range(num_docs):
        is_code = rng.random() < code_fraction
        text = code(rng, 22) if is_code else prose(rng, 700)
        ext = "py" if is_code else "txt"
        raw = text.encode("utf-8")
        docs.append(
            dict(id=f"bench/{i:07d}.{ext}", source="bench", path="", url="", ext=ext,
                 kind="code" if is_code else "prose", code_language="python" if is_code else "",
                 web=False, html=False, raw=raw, text=None, reject=None, bytes_in=len(raw))
        )  # fmt: skip
    return docs


def _cpu_time() -> float:
    t = os.times()
    return t.user + t.system


def bench_chain(docs: list[dict], cfg: dict) -> dict:
    proc = DocumentProcessor(cfg)
    proc.process(dict(docs[0]))  # warm caches (langid model tables)
    cpu, wall = _cpu_time(), time.perf_counter()
    kept = 0
    for doc in docs:
        kept += proc.process(dict(doc))["rejected"] is None
    cpu, wall = _cpu_time() - cpu, time.perf_counter() - wall
    n = len(docs)
    return {
        "chain_docs": n,
        "chain_kept": kept,
        "chain_mean_bytes": round(sum(d["bytes_in"] for d in docs) / n),
        "chain_seconds": round(wall, 3),
        "chain_docs_per_sec_per_core": round(n / max(cpu, 1e-9), 1),
        "chain_ms_per_doc": round(1000 * wall / n, 3),
    }


def bench_steps(docs: list[dict], cfg: dict) -> dict:
    """Milliseconds per document of the heavier pieces, to see where the time goes."""
    from lm.curate.clean import clean_text
    from lm.curate.dedup import MinHasher
    from lm.curate.filters import fineweb_quality, gopher_quality, gopher_repetition
    from lm.curate.langid import LanguageIdentifier
    from lm.curate.safety import PiiScrubber
    from lm.curate.textstats import TextView

    texts = [d["raw"].decode() for d in docs if d["kind"] == "prose"][:300]
    li = LanguageIdentifier(cfg["langid"]["prefix_chars"])
    mh = MinHasher()
    pii = PiiScrubber(cfg["pii"]["kinds"].split(","))
    parts = {
        "clean": lambda t: clean_text(t, is_code=False, is_web=False, cfg=cfg["clean"]),
        "langid": li.classify,
        "gopher_quality": lambda t: gopher_quality(TextView(t), cfg["gopher_quality"]),
        "gopher_repetition": lambda t: gopher_repetition(TextView(t), cfg["gopher_repetition"]),
        "fineweb": lambda t: fineweb_quality(TextView(t), cfg["fineweb"]),
        "pii": pii.scrub,
        "minhash": lambda t: mh.band_keys(mh.signature(TextView(t))),
    }
    out = {}
    for name, fn in parts.items():
        start = time.perf_counter()
        for t in texts:
            fn(t)
        out[f"ms_{name}"] = round(1000 * (time.perf_counter() - start) / len(texts), 3)
    return out


def bench_beam(docs: list[dict]) -> dict:
    from lm.curate.cli import run_curation

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus")
        os.makedirs(corpus)
        for d in docs:  # one file per document: prose as .txt, code as .py (kinds preserved)
            with open(os.path.join(corpus, d["id"].split("/", 1)[1]), "wb") as f:
                f.write(d["raw"])
        cfg = default_config()
        cfg.source.update(type="dir", path=corpus, include="*")
        cfg.output.num_shards = 2
        cpu, wall = _cpu_time(), time.perf_counter()
        rep = run_curation(
            cfg,
            os.path.join(tmp, "out"),
            ["--runner=DirectRunner", "--direct_running_mode=in_memory"],
        )
        cpu, wall = _cpu_time() - cpu, time.perf_counter() - wall
    n = len(docs)
    return {
        "beam_docs": n,
        "beam_kept": rep["kept"][0],
        "beam_seconds": round(wall, 2),
        "beam_docs_per_sec": round(n / wall, 1),
        "beam_docs_per_sec_per_core": round(n / max(cpu, 1e-9), 1),
    }


def run(num_docs: int = 2000, beam: bool = True) -> dict:
    """All the numbers, as a flat dict (called by `make bench`)."""
    cfg = default_config().to_dict()
    docs = _documents(num_docs)
    result = {"langid_prefix_chars": cfg["langid"]["prefix_chars"]}
    result.update(bench_chain(docs, cfg))
    result.update(bench_steps(docs, cfg))
    if beam:
        result.update(bench_beam(docs))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_docs", type=int, default=2000)
    parser.add_argument("--no_beam", action="store_true")
    a = parser.parse_args()
    for key, value in run(a.num_docs, beam=not a.no_beam).items():
        print(f"{key:32s} {value}")
