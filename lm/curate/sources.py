"""Sources: where documents come from, as plain dicts the per-document chain understands.

The driver expands the configured paths into a list of inputs (inputs.py `expand_inputs`); Beam
workers read each one (`read_input`), so reading scales with the number of files. Paths may be
local or `gs://...`: everything goes through `lm.storage`, so a Dataflow job reads buckets. A
document carries raw bytes (decoded and checked by the chain's first step, so invalid UTF-8 and
binary files are counted as rejects rather than crashing a reader) or text (JSONL, Parquet, TFDS),
plus where it came from.

Nothing read is lost: every problem becomes a document with `reject = (step, reason)` - a bad
line, a wrong field type, a truncated `.gz`, an unreadable file or directory, a symlink loop.
Each reader also counts what it read (lines, records, bytes) into a read log, apart from the
chain, and ids are made unique per input file; the pipeline reconciles those ids with what was
written (report.py), so a loss anywhere after the read fails the run.

Ids are unambiguous whatever the data holds: a document id is `<type>/<input>` (one document
per file) or `<type>/<input>:<key>`, where `<input>` is the input's name (unique per run; a file
name may itself hold a `:`) and `<key>` never holds a `:` - the record number, or a record's own
id (an `id` field, a WARC record id) with `%` and `:` percent-escaped (`_record_key`). So the
last `:` splits every id into input and key, two inputs can never produce the same id (a record
whose id is `b.jsonl:1` inside `a.jsonl` cannot pose as a record of `a.jsonl:b.jsonl`), and a
repeat inside one input is renamed (`_make_unique`).

Only regular files are opened: a FIFO, socket or device among the inputs (opening a FIFO
blocks forever; /dev/zero never ends) is a counted reject `not_regular_file:<kind>`, decided by
its type before it is opened (`_type_problem`), and checked again on the open descriptor.
"""

from __future__ import annotations

import errno
import gzip
import os
import posixpath
import stat
import zlib
from collections.abc import Iterator
from typing import Any

import xxhash

from lm import jsonio, storage
from lm.curate.clean import field_string, printable_name, text_problem
from lm.curate.code_filters import PROSE_EXTENSIONS, code_language

CONTAINER_EXTENSIONS = {
    "jsonl": (".jsonl", ".jsonl.gz", ".json"),
    "parquet": (".parquet",),
    "warc": (".warc", ".warc.gz", ".wet", ".wet.gz", ".arc", ".arc.gz"),
}
_HTML_EXTENSIONS = {"html", "htm", "xhtml"}


def _errno_name(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, type(e).__name__)


def _tfds_data_dir(src: dict[str, Any]) -> str | None:
    """`source.tfds_data_dir`, or None for TFDS's default.

    A config key rather than only the TFDS_DATA_DIR variable: TFDS reads that once, at import,
    and remote Beam workers do not inherit the launching shell's environment."""
    return src["tfds_data_dir"] or None


def new_read_log(rel: str) -> dict[str, Any]:
    """What one reader read of one input, counted as it read (not from the documents it made)."""
    return {"input": printable_name(rel), "lines": 0, "blank_lines": 0, "records": 0, "bytes": 0,
            "skipped_records": 0, "duplicate_ids": 0, "error": ""}  # fmt: skip


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


def _ext(path: str | bytes) -> str:
    name = posixpath.basename(os.fsdecode(path)).lower()
    return name.rsplit(".", 1)[1] if "." in name else ""


def _remote(path: str | bytes) -> bool:
    return isinstance(path, str) and storage.is_remote(path)


_BOM = b"\xef\xbb\xbf"
_FILE_KINDS = (
    (stat.S_ISFIFO, "fifo"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "char_device"),
    (stat.S_ISBLK, "block_device"),
    (stat.S_ISDIR, "directory"),
)


def _kind_of(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "special")


def _type_problem(path: str | bytes) -> str | None:
    """`not_regular_file:<kind>` for a local input that is not a regular file (checked with
    stat, never opened), else None. A path stat cannot follow (a symlink loop, no permission) is
    left to the reader, which reports its errno as before. Objects in a bucket are regular."""
    if _remote(path) or (isinstance(path, str) and storage.is_regular_file(path)):
        return None
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else f"not_regular_file:{_kind_of(mode)}"


def _open(path: str | bytes):
    """A binary file object for a local (str, or bytes for a name that is not UTF-8) or remote
    path. A local path is opened non-blocking and its descriptor checked: a file swapped for a
    FIFO after `_type_problem` looked at it is refused, not waited on."""
    if _remote(path):
        return storage.path(path).open("rb")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _Unreadable(f"not_regular_file:{_kind_of(mode)}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _size(path: str | bytes) -> int:
    return storage.path(path).stat().length if _remote(path) else os.path.getsize(path)


def read_file(path: str, rel: str, src: dict[str, Any], log: dict | None = None) -> Iterator[dict]:
    """One document per text file; oversized and unreadable files become rejects."""
    log = log if log is not None else new_read_log(rel)
    ext = _ext(path)
    doc = _base(f"{src['type']}/{rel}", src["type"], rel, ext, src["kind"])
    doc["html"] = doc["web"] = ext in _HTML_EXTENSIONS
    if doc["html"]:
        doc["kind"] = "prose"
    try:
        size = _size(path)
        doc["bytes_in"] = size
        if size > src["max_doc_bytes"]:
            doc["reject"] = ("decode", "oversized")
        else:
            with _open(path) as f:
                doc["raw"] = f.read()
            log["bytes"] += len(doc["raw"])
    except OSError as e:
        doc["reject"] = ("decode", f"read_error:{_errno_name(e)}")
        log["error"] = doc["reject"][1]
    yield doc


def _record_key(record_id: str) -> str:
    """A record's own id as the key part of a document id: `%` and `:` percent-escaped, so the
    key holds no `:` and two different record ids stay different (see the module docstring)."""
    return record_id.replace("%", "%25").replace(":", "%3A")


def _container_doc(src, rel, index, text, url, record_id, raw=None):
    key = _record_key(record_id) if record_id else f"{index:09d}"
    doc_id = f"{src['type']}/{rel}:{key}"
    doc = _base(doc_id, src["type"], rel, "", "prose" if src["kind"] == "auto" else src["kind"])
    doc.update(url=url or "", web=bool(url), text=text, raw=raw)
    doc["bytes_in"] = len(raw) if raw is not None else len(text.encode("utf-8", "replace"))
    if doc["bytes_in"] > src["max_doc_bytes"]:
        doc.update(reject=("decode", "oversized"), raw=None, text=None)
    return doc


def _record_doc(src, rel, index, text, rid, url, size) -> dict[str, Any]:
    """The document of one JSONL line or Parquet row, or a reject saying what is wrong with it."""
    rid, bad_id = field_string(rid, "id", allow_int=True)
    url, bad_url = field_string(url, "url")
    if text is None:
        reason = "null_text"
    elif not isinstance(text, str):
        reason = "invalid_field_type:text"
    else:
        reason = bad_id or bad_url or text_problem(text)
    if reason:
        doc = _container_doc(src, rel, index, "", "", "" if bad_id else rid)
        doc.update(reject=("decode", reason), bytes_in=size)
        return doc
    return _container_doc(src, rel, index, text, url, rid)


def read_jsonl(path: str, rel: str, src: dict[str, Any], log: dict | None = None) -> Iterator[dict]:
    """One document per line; bad JSON (malformed, or nested deeper than `lm.jsonio` allows),
    missing or mistyped fields, bad UTF-8 become rejects. A UTF-8 byte order mark starting a
    line (an editor's, or files concatenated) is dropped, as `utf-8-sig` would."""
    log = log if log is not None else new_read_log(rel)
    with _open(path) as raw_f:
        f = gzip.GzipFile(fileobj=raw_f, mode="rb") if _ext(path) == "gz" else raw_f
        for i, line in enumerate(f):
            if src["max_documents"] and i >= src["max_documents"]:
                return
            log["lines"] += 1
            log["bytes"] += len(line)
            line = line.removeprefix(_BOM)
            if not line.strip():
                log["blank_lines"] += 1
                continue
            record, reason, detail = _parse_line(line)
            if record is None or src["text_field"] not in record:
                doc = _container_doc(src, rel, i, "", "", "")
                doc.update(reject=("decode", reason or "invalid_record"), bytes_in=len(line))
                doc["detail"] = detail or f"no {src['text_field']!r} field"
                yield doc
                continue
            yield _record_doc(
                src, rel, i, record[src["text_field"]], record.get(src["id_field"]),
                record.get(src["url_field"]), len(line),
            )  # fmt: skip


def _parse_line(line: bytes) -> tuple[dict | None, str, str]:
    """(the JSON object of a line, "", "") or (None, reject reason, one-line detail)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, "invalid_utf8", f"invalid UTF-8 at byte {e.start}"
    try:
        record = jsonio.loads(text)
    except jsonio.JSONError as e:
        return None, "invalid_record", str(e)
    if not isinstance(record, dict):
        return None, "invalid_record", f"a JSON {type(record).__name__}, not an object"
    return record, "", ""


def read_parquet(path: str, rel: str, src: dict[str, Any], log: dict | None = None) -> Iterator:
    """One document per row of the `text_field` column (plus id/url columns when present)."""
    import pyarrow.parquet as pq

    log = log if log is not None else new_read_log(rel)
    with _open(path) as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        if src["text_field"] not in names:
            raise ValueError(f"{path}: no column {src['text_field']!r} (has {sorted(names)})")
        cols = [c for c in (src["text_field"], src["id_field"], src["url_field"]) if c in names]
        index = 0
        for batch in pf.iter_batches(columns=cols, batch_size=1024):
            data = batch.to_pydict()
            none = [None] * batch.num_rows
            for j in range(batch.num_rows):
                if src["max_documents"] and index >= src["max_documents"]:
                    return
                text = data[src["text_field"]][j]
                size = len(text.encode("utf-8", "replace")) if isinstance(text, str) else 0
                log["lines"] += 1
                log["bytes"] += size
                rid, url = data.get(src["id_field"], none)[j], data.get(src["url_field"], none)[j]
                yield _record_doc(src, rel, index, text, rid, url, size)
                index += 1


def _http_parts(block: bytes) -> tuple[str, bytes] | None:
    """(Content-Type, payload) of an HTTP response block, or None if it has no header end."""
    head, sep, payload = block.partition(b"\r\n\r\n")
    if not sep:
        return None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-type":
            return value.strip().decode("latin-1"), payload
    return "", payload


def read_warc(path: str, rel: str, src: dict[str, Any], log: dict | None = None) -> Iterator[dict]:
    """HTML responses (text extracted later by the chain) and WET conversion records; a
    response that is not HTML, or a record cut short (a truncated file), is a reject."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    log = log if log is not None else new_read_log(rel)
    types = WarcRecordType.response | WarcRecordType.conversion | WarcRecordType.resource
    with _open(path) as f:
        index = 0
        for record in ArchiveIterator(f, parse_http=False, stream_detect=True):
            log["lines"] += 1
            if not record.record_type & types:
                log["skipped_records"] += 1  # warcinfo, request, metadata: not documents
                continue
            if src["max_documents"] and index >= src["max_documents"]:
                return
            url = record.headers.get("WARC-Target-URI", "") or ""
            rid = (record.record_id or "").strip("<>").replace("urn:uuid:", "")
            block = record.reader.read()
            log["bytes"] += len(block)
            doc = _container_doc(src, rel, index, "", url, rid, raw=block)
            doc["web"] = True
            index += 1
            if len(block) < record.content_length:
                doc.update(reject=("decode", "truncated_record"), raw=None)
            elif record.record_type == WarcRecordType.response:
                parts = _http_parts(block)
                if parts is None:
                    doc.update(reject=("decode", "invalid_http"), raw=None)
                elif parts[0] and "html" not in parts[0].lower():
                    doc.update(reject=("decode", "not_html"), raw=None)
                else:
                    doc.update(raw=parts[1], html=True, bytes_in=len(parts[1]))
            yield doc


def read_tfds(name: str, src: dict[str, Any], log: dict | None = None) -> Iterator[dict]:
    """Documents from a locally prepared TFDS dataset's `text_field` feature."""
    import tensorflow_datasets as tfds

    log = log if log is not None else new_read_log(name)
    split, data_dir = src["tfds_split"], _tfds_data_dir(src)
    ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False, download=False)
    for i, example in enumerate(tfds.as_numpy(ds)):
        if src["max_documents"] and i >= src["max_documents"]:
            return
        value = example[src["text_field"]]
        raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
        log["lines"] += 1
        log["bytes"] += len(raw)
        doc = _base(f"tfds/{name}/{src['tfds_split']}:{i:09d}", "tfds", name, "", src["kind"])
        if src["kind"] == "auto":
            doc["kind"] = "prose"
        doc.update(raw=raw, bytes_in=len(raw))
        yield doc


def _failure_reason(e: Exception) -> str:
    """A short reject reason for an input that a reader could not finish."""
    if isinstance(e, EOFError):
        return "truncated"  # gzip: "Compressed file ended before the end-of-stream marker"
    if isinstance(e, (gzip.BadGzipFile, zlib.error)):
        return "corrupt_gzip"
    if isinstance(e, OSError) and e.errno:
        return f"read_error:{_errno_name(e)}"
    return f"unreadable_container:{type(e).__name__}"


def _make_unique(doc: dict[str, Any], seen: set[int], log: dict[str, Any]) -> None:
    """Renames a document whose id this input already produced (a repeated record id): `#dupN`
    with N its record number in the input; counted in the read log. Only 8-byte hashes are kept
    per input, so a reader's memory grows slowly with the records of one file."""
    doc["id"], doc["path"] = printable_name(doc["id"]), printable_name(doc["path"])
    key = xxhash.xxh64_intdigest(doc["id"].encode("utf-8", "surrogatepass"))
    if key in seen:
        log["duplicate_ids"] += 1
        doc["id"] = f"{doc['id']}#dup{log['records']}"
        while (key := xxhash.xxh64_intdigest(doc["id"].encode("utf-8", "surrogatepass"))) in seen:
            doc["id"] += "+"
    seen.add(key)


def read_input(item: tuple, src: dict[str, Any], log: dict | None = None) -> Iterator[dict]:
    """Dispatches one expanded input to its reader; counts what it read into `log` (see
    `new_read_log`). A reader failure becomes one more reject, after what it had read."""
    path, rel = item[0], item[1]
    log = log if log is not None else new_read_log(rel)
    kind = src["type"]
    readers = {"jsonl": read_jsonl, "parquet": read_parquet, "warc": read_warc}
    seen: set[int] = set()
    file_kind = kind in ("stdlib", "dir", "text")
    try:
        if len(item) > 2:  # expand_inputs found it but cannot read it (a loop, a locked dir)
            raise _Unreadable(item[2])
        if kind != "tfds" and (problem := _type_problem(path)):
            raise _Unreadable(problem)  # a FIFO, socket or device: never opened
        if kind == "tfds":
            docs = read_tfds(path, src, log)
        elif kind in readers:
            docs = readers[kind](path, rel, src, log)
        else:
            docs = read_file(path, rel, src, log)
        for doc in docs:
            _make_unique(doc, seen, log)
            log["records"] += 1
            yield doc
    except Exception as e:  # noqa: BLE001 - a corrupt container must not kill the run
        reason = str(e) if isinstance(e, _Unreadable) else _failure_reason(e)
        log["error"] = reason
        doc_id = f"{kind}/{rel}" if file_kind else f"{kind}/{rel}:unreadable"
        doc = _base(doc_id, kind, rel, _ext(path), src["kind"])
        doc["reject"] = ("decode", reason)
        doc["detail"] = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        _make_unique(doc, seen, log)
        log["records"] += 1
        yield doc


class _Unreadable(Exception):
    """An input `expand_inputs` already knew could not be read; the message is the reason."""
