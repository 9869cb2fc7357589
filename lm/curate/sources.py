"""Sources: where documents come from, as plain dicts the per-document chain understands.

The driver expands the configured paths into a list of files (`expand_inputs`); Beam workers read
each file (`read_input`), so reading scales with the number of files. A document carries raw
bytes (decoded and checked by the chain's first step, so invalid UTF-8 and binary files are
counted as rejects rather than crashing a reader) or text (JSONL, Parquet, TFDS), plus where it
came from. Files over `max_doc_bytes` are never read: they become `oversized` rejects.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import sysconfig
from collections.abc import Iterator
from typing import Any

from lm.curate.code_filters import PROSE_EXTENSIONS, code_language
from lm.errors import ConfigError

_CONTAINER_EXTENSIONS = {
    "jsonl": (".jsonl", ".jsonl.gz", ".json"),
    "parquet": (".parquet",),
    "warc": (".warc", ".warc.gz", ".wet", ".wet.gz", ".arc", ".arc.gz"),
}
_HTML_EXTENSIONS = {"html", "htm", "xhtml"}


def _globs(value: str) -> list[str]:
    return [g.strip() for g in value.split(",") if g.strip()]


def _matches(rel: str, patterns: list[str]) -> bool:
    name = os.path.basename(rel)
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _walk(root: str, include: list[str], exclude: list[str]) -> list[tuple[str, str]]:
    """(absolute path, path relative to root) of files under root, sorted for stable ids."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if include and not _matches(rel, include):
                continue
            if exclude and (_matches(rel, exclude) or _matches("/" + rel, exclude)):
                continue
            out.append((path, rel))
    return out


def _tfds_data_dir(src: dict[str, Any]) -> str | None:
    """`source.tfds_data_dir`, or None for TFDS's default.

    A config key rather than only the TFDS_DATA_DIR variable: TFDS reads that once, at import,
    and remote Beam workers do not inherit the launching shell's environment."""
    return src["tfds_data_dir"] or None


def expand_inputs(src: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, relative name) pairs to read, or raises ConfigError for a missing input."""
    kind = src["type"]
    include, exclude = _globs(src["include"]), _globs(src["exclude"])
    if kind == "tfds":
        if not src["tfds_name"]:
            raise ConfigError("source.type=tfds needs --config.source.tfds_name=NAME")
        import tensorflow_datasets as tfds

        try:
            prepared = tfds.builder(src["tfds_name"], data_dir=_tfds_data_dir(src)).is_prepared()
        except Exception as e:  # noqa: BLE001 - unknown name, bad version...: a user error
            raise ConfigError(f"TFDS dataset {src['tfds_name']!r}: {e}".splitlines()[0]) from None
        if not prepared:
            raise ConfigError(
                f"TFDS dataset {src['tfds_name']!r} is not prepared locally (no downloads here); "
                "run tfds build for it first or point --config.source.tfds_data_dir at it"
            )
        return [(src["tfds_name"], src["tfds_name"])]
    if kind == "stdlib":
        roots = [sysconfig.get_paths()["stdlib"]]
    else:
        roots = [p.strip() for p in src["path"].split(",") if p.strip()]
        if not roots:
            raise ConfigError(f"source.type={kind} needs --config.source.path=PATH")
    if kind not in ("stdlib", "dir", "text", *_CONTAINER_EXTENSIONS):
        raise ConfigError(
            f"unknown source.type {kind!r}; use stdlib, dir, text, jsonl, parquet, warc or tfds"
        )
    matches: list[str] = []
    for root in roots:
        hits = sorted(glob.glob(root)) if glob.has_magic(root) else [root]
        if not hits or not all(os.path.exists(m) for m in hits):
            raise ConfigError(f"input path not found: {root}")
        matches += [os.path.abspath(m) for m in hits]
    # Ids are paths relative to one base, so they stay unique across several roots: a single
    # directory is its own base; otherwise the common parent of everything matched.
    if len(matches) == 1 and os.path.isdir(matches[0]):
        base = matches[0]
    else:
        base = os.path.commonpath([m if os.path.isdir(m) else os.path.dirname(m) for m in matches])
        if len(matches) > 1 and all(os.path.isdir(m) for m in matches) and base in matches:
            base = os.path.dirname(base)
    found: list[tuple[str, str]] = []
    for match in matches:
        if os.path.isdir(match):
            pats = include
            if kind in _CONTAINER_EXTENSIONS:
                pats = ["*" + e for e in _CONTAINER_EXTENSIONS[kind]]
            found += [(p, os.path.relpath(p, base)) for p, _ in _walk(match, pats, exclude)]
        else:
            found.append((match, os.path.relpath(match, base)))
    if src["max_documents"] and kind in ("stdlib", "dir", "text"):
        found = found[: src["max_documents"]]
    return found


def _doc_kind(ext: str, forced: str) -> tuple[str, str]:
    """('prose' | 'code', programming language or '') from the extension and `source.kind`."""
    if forced == "prose":
        return "prose", ""
    lang = code_language(ext)
    if forced == "code":
        return "code", lang or ext or "unknown"
    if lang is not None and ext not in PROSE_EXTENSIONS:
        return "code", lang
    return "prose", ""


def _base(doc_id: str, source: str, path: str, ext: str, forced: str) -> dict[str, Any]:
    kind, lang = _doc_kind(ext, forced)
    return dict(
        id=doc_id, source=source, path=path, url="", ext=ext, kind=kind, code_language=lang,
        web=False, html=False, raw=None, text=None, reject=None, bytes_in=0,
    )  # fmt: skip


def _ext(path: str) -> str:
    name = os.path.basename(path).lower()
    return name.rsplit(".", 1)[1] if "." in name else ""


def read_file(path: str, rel: str, src: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One document per text file; oversized and unreadable files become rejects."""
    ext = _ext(path)
    doc = _base(f"{src['type']}/{rel}", src["type"], rel, ext, src["kind"])
    doc["html"] = doc["web"] = ext in _HTML_EXTENSIONS
    if doc["html"]:
        doc["kind"] = "prose"
    try:
        size = os.path.getsize(path)
        doc["bytes_in"] = size
        if size > src["max_doc_bytes"]:
            doc["reject"] = ("decode", "oversized")
        else:
            with open(path, "rb") as f:
                doc["raw"] = f.read()
    except OSError as e:
        doc["reject"] = ("decode", f"read_error:{type(e).__name__}")
    yield doc


def _container_doc(src, rel, index, text, url, record_id, raw=None):
    doc_id = f"{src['type']}/{rel}:{record_id}" if record_id else f"{src['type']}/{rel}:{index:09d}"
    doc = _base(doc_id, src["type"], rel, "", "prose" if src["kind"] == "auto" else src["kind"])
    doc.update(url=url or "", web=bool(url), text=text, raw=raw)
    doc["bytes_in"] = len(raw) if raw is not None else len(text.encode("utf-8", "replace"))
    if doc["bytes_in"] > src["max_doc_bytes"]:
        doc.update(reject=("decode", "oversized"), raw=None, text=None)
    return doc


def read_jsonl(path: str, rel: str, src: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One document per line; bad JSON, a missing text field or bad UTF-8 become rejects."""
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for i, line in enumerate(f):
            if src["max_documents"] and i >= src["max_documents"]:
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
                text = record[src["text_field"]]
                if not isinstance(text, str):
                    raise TypeError
            except UnicodeDecodeError:
                doc = _container_doc(src, rel, i, "", "", "")
                doc.update(reject=("decode", "invalid_utf8"), bytes_in=len(line))
                yield doc
                continue
            except (ValueError, KeyError, TypeError):
                doc = _container_doc(src, rel, i, "", "", "")
                doc.update(reject=("decode", "invalid_record"), bytes_in=len(line))
                yield doc
                continue
            rid = record.get(src["id_field"], "") if isinstance(record, dict) else ""
            url = record.get(src["url_field"], "") or ""
            yield _container_doc(src, rel, i, text, str(url), str(rid) if rid != "" else "")


def read_parquet(path: str, rel: str, src: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One document per row of the `text_field` column (plus id/url columns when present)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    if src["text_field"] not in names:
        raise ValueError(f"{path}: no column {src['text_field']!r} (has {sorted(names)})")
    cols = [c for c in (src["text_field"], src["id_field"], src["url_field"]) if c in names]
    index = 0
    for batch in pf.iter_batches(columns=cols, batch_size=1024):
        data = batch.to_pydict()
        for j in range(batch.num_rows):
            if src["max_documents"] and index >= src["max_documents"]:
                return
            text = data[src["text_field"]][j]
            rid = data.get(src["id_field"], [""] * batch.num_rows)[j]
            url = data.get(src["url_field"], [""] * batch.num_rows)[j]
            if text is None:
                doc = _container_doc(src, rel, index, "", "", str(rid or ""))
                doc["reject"] = ("decode", "empty")
            else:
                doc = _container_doc(src, rel, index, text, str(url or ""), str(rid or ""))
            yield doc
            index += 1


def read_warc(path: str, rel: str, src: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """HTML responses (text extracted later by the chain) and WET conversion records."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    types = WarcRecordType.response | WarcRecordType.conversion | WarcRecordType.resource
    records = ArchiveIterator(
        path, record_types=types, parse_http=True, stream_detect=True, fsspec_args=False
    )
    for index, record in enumerate(records):
        if src["max_documents"] and index >= src["max_documents"]:
            return
        url = record.headers.get("WARC-Target-URI", "") or ""
        rid = (record.record_id or "").strip("<>").replace("urn:uuid:", "")
        payload = record.reader.read()
        doc = _container_doc(src, rel, index, "", url, rid, raw=payload)
        doc["web"] = True
        if record.record_type == WarcRecordType.response:
            ctype = record.http_headers.get("Content-Type", "") if record.http_headers else ""
            if ctype and "html" not in ctype.lower():
                doc.update(reject=("decode", "not_html"), raw=None)
            doc["html"] = True
        yield doc


def read_tfds(name: str, src: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Documents from a locally prepared TFDS dataset's `text_field` feature."""
    import tensorflow_datasets as tfds

    split, data_dir = src["tfds_split"], _tfds_data_dir(src)
    ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False, download=False)
    for i, example in enumerate(tfds.as_numpy(ds)):
        if src["max_documents"] and i >= src["max_documents"]:
            return
        value = example[src["text_field"]]
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        doc = _base(f"tfds/{name}/{src['tfds_split']}:{i:09d}", "tfds", name, "", src["kind"])
        if src["kind"] == "auto":
            doc["kind"] = "prose"
        doc.update(raw=raw, bytes_in=len(raw))
        yield doc


def read_input(item: tuple[str, str], src: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Dispatches one expanded input to its reader; a reader failure becomes a reject."""
    path, rel = item
    kind = src["type"]
    readers = {"jsonl": read_jsonl, "parquet": read_parquet, "warc": read_warc}
    try:
        if kind == "tfds":
            yield from read_tfds(path, src)
        elif kind in readers:
            yield from readers[kind](path, rel, src)
        else:
            yield from read_file(path, rel, src)
    except Exception as e:  # noqa: BLE001 - a corrupt container must not kill the run
        doc = _base(f"{kind}/{rel}:unreadable", kind, rel, _ext(path), src["kind"])
        doc["reject"] = ("decode", f"unreadable_container:{type(e).__name__}")
        yield doc
