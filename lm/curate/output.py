"""Output layout: sharded ArrayRecord documents, JSONL rejects, `manifest.json`, and the reader.

    <output>/documents-00000-of-00004.array_record   one JSON record per kept document
    <output>/rejects/rejects-00000-of-00004.jsonl    one JSON line per removed document
    <output>/manifest.json                           sources, config hash, counts, shard files
    <output>/data_report.{md,json}, plots/*.png      the run report (report.py)

Documents go to shard `xxh64(id) % num_shards` and are written sorted by id, so the files are the
same whichever runner (or how many workers) produced them. ArrayRecord is written with
`group_size:1` so readers (grain, seqio) can seek to any record.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import xxhash

KEPT_FIELDS = ("id", "source", "path", "url", "kind", "language", "lang_score", "pii", "text")
DOCS_PREFIX = "documents"
REJECTS_DIR = "rejects"


def shard_of(doc_id: str, num_shards: int) -> int:
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8")) % num_shards


def kept_record(doc: dict[str, Any]) -> dict[str, Any]:
    """The stored form of a kept document: text plus the metadata a training task needs."""
    return {k: doc.get(k) for k in KEPT_FIELDS}


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
    return "://" not in path


def _publish(local_tmp: str, dest: str) -> None:
    """Moves a finished local file into place (atomically when local, by copy otherwise)."""
    if _is_local(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(local_tmp, dest)
        return
    from apache_beam.io.filesystems import FileSystems

    with open(local_tmp, "rb") as src, FileSystems.create(dest) as dst:
        shutil.copyfileobj(src, dst)
    os.remove(local_tmp)


def write_documents(path: str, records: Iterable[dict[str, Any]]) -> None:
    """One ArrayRecord file of JSON-encoded documents."""
    from array_record.python.array_record_module import ArrayRecordWriter

    fd, tmp = tempfile.mkstemp(suffix=".array_record")
    os.close(fd)
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for record in records:
        writer.write(json.dumps(record, ensure_ascii=False).encode("utf-8"))
    writer.close()
    _publish(tmp, path)


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".jsonl")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    _publish(tmp, path)


def shard_path(output_dir: str, kind: str, index: int, num_shards: int) -> str:
    if kind == "documents":
        return f"{output_dir}/{DOCS_PREFIX}-{index:05d}-of-{num_shards:05d}.array_record"
    return f"{output_dir}/{REJECTS_DIR}/rejects-{index:05d}-of-{num_shards:05d}.jsonl"


def clear_previous(output_dir: str) -> None:
    """Removes this stage's files from an earlier run into the same (local) directory, so the
    manifest never lists stale shards. Other files are left alone."""
    if not _is_local(output_dir) or not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(DOCS_PREFIX + "-") or name in ("manifest.json", "_stats.json"):
            os.remove(path)
        elif name.startswith("data_report."):
            os.remove(path)
        elif name in (REJECTS_DIR, "plots") and os.path.isdir(path):
            shutil.rmtree(path)


def write_bytes(path: str, data: bytes) -> None:
    """Writes a small file to a local or remote (gs://...) path."""
    if _is_local(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as f:
        f.write(data)


def remove(path: str) -> None:
    if _is_local(path):
        if os.path.exists(path):
            os.remove(path)
        return
    from apache_beam.io.filesystems import FileSystems

    FileSystems.delete([path])


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def read_text(path: str) -> str:
    if _is_local(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


def read_manifest(output_dir: str) -> dict[str, Any]:
    return json.loads(read_text(f"{output_dir}/manifest.json"))


def read_documents(output_dir: str) -> Iterator[dict[str, Any]]:
    """Every kept document of a finished run, shard by shard (each shard sorted by id)."""
    from array_record.python.array_record_module import ArrayRecordReader

    manifest = read_manifest(output_dir)
    for name in manifest["shards"]["documents"]:
        path = f"{output_dir}/{name}"
        reader = ArrayRecordReader(path)
        try:
            n = reader.num_records()
            for start in range(0, n, 1024):
                for raw in reader.read(list(range(start, min(start + 1024, n)))):
                    yield json.loads(raw)
        finally:
            reader.close()


def read_rejects(output_dir: str) -> Iterator[dict[str, Any]]:
    """Every removed document (step, reason, truncated text) of a finished run."""
    manifest = read_manifest(output_dir)
    for name in manifest["shards"]["rejects"]:
        for line in read_text(f"{output_dir}/{name}").splitlines():
            if line:
                yield json.loads(line)
