"""Output layout: sharded ArrayRecord documents, JSONL rejects, `manifest.json`, and the reader.

    <output>/documents-00000-of-00004.array_record   one JSON record per kept document
    <output>/rejects/rejects-00000-of-00004.jsonl    one JSON line per removed document
    <output>/manifest.json                           sources, config hash, counts, shard files
    <output>/data_report.{md,json}, plots/*.png      the run report (report.py)

Documents go to shard `xxh64(id) % num_shards`, so the set of files, and the records in each, are
the same whichever runner (or how many workers) produced them; within a shard records are in
arrival order (`ShardWriter` streams them, never sorting a shard in memory). ArrayRecord is
written with `group_size:1` so readers (grain, seqio) can seek to any record. `<output>` may be
a local directory or `gs://...` (all I/O goes through `lm.storage`).

A run writes all of this into a staging directory and swaps it in only when it reconciled
(publish.py), so `manifest.json` exists only in a complete, reconciled output; readers go through
`read_manifest`, which also refuses a manifest that says `reconciled: false`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import xxhash

from lm import jsonio, storage
from lm.errors import DataError

KEPT_FIELDS = ("id", "source", "path", "url", "kind", "language", "lang_score", "pii", "text")
DOCS_PREFIX = "documents"
REJECTS_DIR = "rejects"
MANIFEST = "manifest.json"
# What a manifest may list: a shard name this module writes, never a path outside the output.
_SHARD_NAME = re.compile(rf"^(?:{REJECTS_DIR}/)?[A-Za-z0-9_.-]+$")


def shard_of(doc_id: str, num_shards: int) -> int:
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8")) % num_shards


def kept_record(doc: dict[str, Any]) -> dict[str, Any]:
    """The stored form of a kept document: text plus the metadata a training task needs."""
    record = {k: doc.get(k) for k in KEPT_FIELDS}
    if doc.get("encoding"):  # decoded from a legacy encoding (clean.decode_detail)
        record["encoding"] = doc["encoding"]
    return record


def reject_record(doc: dict[str, Any], text_chars: int) -> dict[str, Any]:
    """The stored form of a removed document: where it came from, which step and why."""
    step, reason = doc["rejected"]
    text = doc.get("text") or ""
    return {
        "id": doc["id"],
        "source": doc["source"],
        "path": doc.get("path", ""),
        "url": doc.get("url", ""),
        "kind": doc.get("kind", ""),
        "step": step,
        "reason": reason,
        "detail": doc.get("detail", ""),
        "bytes_in": doc.get("bytes_in", 0),
        "language": doc.get("language", ""),
        "text": text[:text_chars] if text_chars else "",
    }


def _is_local(path: str) -> bool:
    return not storage.is_remote(path)


def _publish(local_tmp: str, dest: str) -> None:
    """Moves a finished local file into place: atomically when local; when remote, one object
    upload streamed in 1 MiB pieces (GCS makes the object visible only once complete)."""
    if _is_local(dest):
        os.replace(local_tmp, dest)
        return
    try:
        with open(local_tmp, "rb") as src, storage.path(dest).open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    finally:
        os.remove(local_tmp)


class ShardWriter:
    """Streams records into one shard (`documents` ArrayRecord or `rejects` JSONL) as they come.

    Nothing is held per record: each is encoded and written to a local temporary file, which is
    published when the shard is closed, so a worker's memory does not grow with shard size. The
    order of records inside a shard is their arrival order; which shard a document goes to is a
    function of its id alone (`shard_of`), so the set of files and their contents as sets are the
    same under any runner."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind, self.count = path, kind, 0
        suffix = ".array_record" if kind == "documents" else ".jsonl"
        local_dir = None  # a remote shard is staged in the system temp dir, then uploaded
        if _is_local(path):  # staged next to its final name, so publishing is one rename
            local_dir = os.path.dirname(os.path.abspath(path))
            os.makedirs(local_dir, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(suffix=suffix, prefix=".tmp-shard-", dir=local_dir)
        if kind == "documents":
            from array_record.python.array_record_module import ArrayRecordWriter

            os.close(fd)
            self._writer = ArrayRecordWriter(self._tmp, "group_size:1")
            self._file = None
        else:
            self._writer = None
            self._file = os.fdopen(fd, "wb")

    def write(self, record: dict[str, Any]) -> None:
        # `replace`: a lone surrogate that got past the readers' checks must not kill the shard.
        data = json.dumps(record, ensure_ascii=False).encode("utf-8", "replace")
        if self._writer is not None:
            self._writer.write(data)
        else:
            self._file.write(data + b"\n")
        self.count += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        else:
            self._file.close()
        _publish(self._tmp, self.path)

    def abort(self) -> None:
        """Drops the temporary file of a shard that failed half way (the bundle is retried)."""
        try:
            if self._writer is not None:
                self._writer.close()
            else:
                self._file.close()
        finally:
            if os.path.exists(self._tmp):
                os.remove(self._tmp)


def write_documents(path: str, records: Iterable[dict[str, Any]]) -> int:
    """One ArrayRecord file of JSON-encoded documents, streamed; returns the record count."""
    return _write_all(ShardWriter(path, "documents"), records)


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> int:
    return _write_all(ShardWriter(path, "rejects"), records)


def _write_all(writer: ShardWriter, records: Iterable[dict[str, Any]]) -> int:
    try:
        for record in records:
            writer.write(record)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return writer.count


def shard_path(output_dir: str, kind: str, index: int, num_shards: int) -> str:
    if kind == "documents":
        return f"{output_dir}/{DOCS_PREFIX}-{index:05d}-of-{num_shards:05d}.array_record"
    return f"{output_dir}/{REJECTS_DIR}/rejects-{index:05d}-of-{num_shards:05d}.jsonl"


def write_bytes(path: str, data: bytes) -> None:
    """Writes a small file to a local or remote (gs://...) path."""
    storage.write_bytes(path, data)


def remove(path: str) -> None:
    storage.remove(path)


def write_text(path: str, text: str) -> None:
    storage.write_text(path, text)


def read_text(path: str) -> str:
    return storage.read_text(path)


def read_manifest(output_dir: str) -> dict[str, Any]:
    """The manifest of a finished, reconciled run; DataError (one line) for a directory that has
    none, a manifest that is not valid JSON, one that lists a path outside the directory, or one
    that says the run did not reconcile (an output of an older version that wrote it anyway)."""
    path = f"{output_dir.rstrip('/')}/{MANIFEST}"
    if not storage.exists(path):
        raise DataError(f"{output_dir} has no {MANIFEST}: not a finished `lm data run` output")
    try:
        manifest = jsonio.read_json(path)
    except jsonio.JSONError as e:
        raise DataError(str(e)) from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    names = [n for kind in ("documents", "rejects") for n in (shards or {}).get(kind, [])]
    if not isinstance(shards, dict) or not all(
        isinstance(n, str) and _SHARD_NAME.match(n) for n in names
    ):
        raise DataError(f"{path} is not an `lm data run` manifest (bad or missing shard list)")
    if manifest.get("reconciled") is not True:
        raise DataError(
            f"{output_dir}: this curation run did not reconcile (manifest says reconciled: "
            f"{manifest.get('reconciled')}), so none of it is read; run `lm data run` again"
        )
    return manifest


def read_documents(output_dir: str) -> Iterator[dict[str, Any]]:
    """Every kept document of a finished run, shard by shard (a gs:// shard is downloaded
    first: ArrayRecord reads local files)."""
    from array_record.python.array_record_module import ArrayRecordReader

    manifest = read_manifest(output_dir)
    for name in manifest["shards"]["documents"]:
        reader = ArrayRecordReader(storage.local_copy(f"{output_dir}/{name}"))
        try:
            n = reader.num_records()
            for start in range(0, n, 1024):
                for raw in reader.read(list(range(start, min(start + 1024, n)))):
                    yield jsonio.loads(raw)
        finally:
            reader.close()


def read_rejects(output_dir: str) -> Iterator[dict[str, Any]]:
    """Every removed document (step, reason, truncated text) of a finished run."""
    manifest = read_manifest(output_dir)
    for name in manifest["shards"]["rejects"]:
        with storage.path(f"{output_dir}/{name}").open("rb") as f:
            for line in f:
                if line.strip():
                    yield jsonio.loads(line)
