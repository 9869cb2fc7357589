"""The per-document chain: decode, clean, URL blocklist, langid, quality, safety, PII, decontam.

Everything that looks at one document at a time runs here, in one function, so Beam pays its
per-element overhead once per document (not once per step) and the benchmark can time the chain
without Beam. Each step either passes the document on (recording its size in `trace`, which the
report turns into documents and bytes in/out per step) or stops it with `rejected = (step,
reason)`. The chain also computes the exact-dedup key and the MinHash band keys that the
shuffle-based dedup stages consume.
"""

from __future__ import annotations

from typing import Any

from lm.curate.c4 import C4Filter
from lm.curate.clean import clean_text, decode_detail, text_problem
from lm.curate.code_filters import code_quality
from lm.curate.dedup import Decontaminator, MinHasher, eval_texts, exact_key
from lm.curate.filters import fineweb_quality, gopher_quality, gopher_repetition
from lm.curate.langid import LanguageIdentifier
from lm.curate.safety import (
    DEFAULT_BLOCKLIST,
    Blocklist,
    PiiScrubber,
    UrlBlocklist,
    load_word_list,
)
from lm.curate.textstats import TextView

# Every step that can remove a document, in chain order (dedup steps run after the chain).
STEPS = (
    "decode",
    "clean",
    "url_blocklist",
    "langid",
    "gopher_quality",
    "gopher_repetition",
    "c4",
    "fineweb",
    "code",
    "blocklist",
    "pii",
    "decontam",
    "exact_dedup",
    "near_dedup",
    "error",  # a document that made a step raise (a bug): kept out, counted, never lost
)


def _csv(value: str) -> list[str]:
    return [s.strip() for s in value.split(",") if s.strip()]


def extract_html(raw: bytes) -> str:
    """Main text of an HTML page (resiliparse: boilerplate-aware, drops nav/footer blocks)."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    html = bytes_to_str(raw, detect_encoding(raw))
    return extract_plain_text(html, main_content=True, alt_texts=False, links=False)


class DocumentProcessor:
    """Built once per worker from the config (a plain dict); `process` runs one document."""

    def __init__(self, cfg: dict[str, Any], decontam_index=None):
        """`decontam_index`: precomputed eval-set n-gram hashes (the pipeline computes them once
        on the driver); None builds them here from `decontam.eval_sets`."""
        self.cfg = cfg
        langs = tuple(_csv(cfg["langid"]["languages"]))
        self.langid = (
            LanguageIdentifier(cfg["langid"]["prefix_chars"]) if cfg["langid"]["enabled"] else None
        )
        self.languages = frozenset(langs)
        bl = cfg["blocklist"]
        words = load_word_list(bl["words"], bl["file"], DEFAULT_BLOCKLIST)
        self.blocklist = Blocklist(words, bl["min_hits"], bl["max_fraction"])
        self.c4 = C4Filter(cfg["c4"], words)
        ub = cfg["url_blocklist"]
        self.urls = UrlBlocklist(load_word_list(ub["domains"], ub["file"]))
        self.pii = PiiScrubber(_csv(cfg["pii"]["kinds"]))
        dd = cfg["decontam"]
        if decontam_index is not None:
            self.decontam = Decontaminator([], dd["ngram"])
            self.decontam.index = decontam_index if dd["enabled"] else self.decontam.index
        else:
            spec = dd["eval_sets"] if dd["enabled"] else ""
            self.decontam = Decontaminator(eval_texts(spec), dd["ngram"])
        d = cfg["dedup"]
        self.minhash = MinHasher(d["bands"], d["rows"], d["ngram"], d["seed"])

    def process(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Runs the chain; the result has `rejected` set, or `text` cleaned and dedup keys."""
        cfg = self.cfg
        trace: list[tuple[str, int]] = []
        doc["trace"] = trace
        doc["rejected"] = None

        def reject(step: str, reason: str) -> dict[str, Any]:
            doc["rejected"] = (step, reason)
            doc.pop("raw", None)
            return doc

        if doc.get("reject"):
            return reject(*doc["reject"])
        raw = doc.pop("raw", None)
        if raw is not None:
            if doc.get("html"):
                text = extract_html(raw) if raw.strip() else ""
                if not text.strip():
                    return reject("decode", "empty")
            else:
                text, reason, encoding = decode_detail(raw)
                if reason:
                    return reject("decode", reason)
                if encoding != "utf-8":
                    doc["encoding"] = encoding
            doc["text"] = text
        elif not (doc.get("text") or "").strip():
            return reject("decode", "empty")
        else:
            reason = text_problem(doc["text"])
            if reason:  # text from a container (JSON, Parquet): checked here as well as there
                doc["text"] = ""
                return reject("decode", reason)
        trace.append(("decode", len(doc["text"].encode("utf-8"))))

        is_code = doc["kind"] == "code"
        text = clean_text(doc["text"], is_code=is_code, is_web=doc["web"], cfg=cfg["clean"])
        doc["text"] = text
        if not text:
            return reject("clean", "empty_after_clean")
        trace.append(("clean", len(text.encode("utf-8"))))

        if doc["web"] and cfg["url_blocklist"]["enabled"] and doc["url"]:
            reason = self.urls.check(doc["url"])
            if reason:
                return reject("url_blocklist", reason)
            trace.append(("url_blocklist", trace[-1][1]))

        if is_code:
            doc["language"], doc["lang_score"] = f"code:{doc['code_language']}", 1.0
        elif self.langid is not None:
            lang, score = self.langid.classify(text)
            doc["language"], doc["lang_score"] = lang, round(score, 4)
            if self.languages and lang not in self.languages:
                return reject("langid", f"language:{lang}")
            if score < cfg["langid"]["min_score"]:
                return reject("langid", "low_score")
            trace.append(("langid", trace[-1][1]))
        else:
            doc["language"], doc["lang_score"] = "und", 0.0

        view = TextView(text)
        if is_code:
            if cfg["code"]["enabled"]:
                reason = code_quality(view, doc["ext"], cfg["code"])
                if reason:
                    return reject("code", reason)
                trace.append(("code", trace[-1][1]))
        else:
            for step, fn in (
                ("gopher_quality", gopher_quality),
                ("gopher_repetition", gopher_repetition),
            ):
                if cfg[step]["enabled"]:
                    reason = fn(view, cfg[step])
                    if reason:
                        return reject(step, reason)
                    trace.append((step, trace[-1][1]))
            if cfg["c4"]["enabled"]:
                new_text, reason = self.c4(text, view.word_set)
                if reason:
                    return reject("c4", reason)
                if new_text != text:
                    text = doc["text"] = new_text
                    view = TextView(text)
                trace.append(("c4", len(text.encode("utf-8"))))
            if cfg["fineweb"]["enabled"]:
                reason = fineweb_quality(view, cfg["fineweb"])
                if reason:
                    return reject("fineweb", reason)
                trace.append(("fineweb", trace[-1][1]))

        if cfg["blocklist"]["enabled"]:
            reason = self.blocklist.check(view.norm_words, view.lower_text, view.word_set)
            if reason:
                return reject("blocklist", reason)
            trace.append(("blocklist", trace[-1][1]))

        if cfg["pii"]["enabled"]:
            new_text, counts = self.pii.scrub(text)
            doc["pii"] = counts
            if new_text != text:
                text = doc["text"] = new_text
                view = TextView(text)
            trace.append(("pii", len(text.encode("utf-8"))))

        if len(self.decontam):
            reason = self.decontam.check(view)
            if reason:
                return reject("decontam", reason)
            trace.append(("decontam", trace[-1][1]))

        doc["exact_key"] = exact_key(view)
        sig = self.minhash.signature(view) if cfg["dedup"]["near"] else None
        doc["band_keys"] = self.minhash.band_keys(sig) if sig is not None else []
        return doc
