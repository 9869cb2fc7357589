"""Document sources: one deterministic stream of text documents per (data config, split, shard).

The tokenizer trainer and the packing both read documents through
`lm.data.documents.iter_documents` (which adds mixtures on top of `iter_source_documents` here),
so the tokenizer sees exactly the text the model will train on. Every source follows the same
plan:

1. enumerate cheap document references (a path, a chunk of a file, a JSONL line, a TFDS index) in
   a fixed order, capped at `max_documents`;
2. assign each reference to `train` or `validation` with a stable hash of its key, so the two
   splits never share a document and the assignment survives reordering or adding files;
3. keep only this host's share (position within the split % num_shards == shard_index);
4. only then read the text (the expensive part), skipping undecodable or oversized files
   (they still count toward `max_documents`, which caps references, not survivors).

JSONL and TFDS records have no cheap random access, so they are streamed once in file order and
follow the same rules (key = file:line or the TFDS index); only this shard's records are parsed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ml_collections

from lm import jsonio
from lm.data.files import (
    SkipStats,
    decode_utf8,
    expand_paths,
    globs,
    missing_path,
    read_file,
    walk,
    warn_once,
)
from lm.data.tf_quiet import tf_cpu_only
from lm.errors import DataError

SPLITS = ("train", "validation")
# Data-config keys that change which documents a Task yields.
DOC_KEYS = (
    "source",
    "path",
    "include",
    "exclude",
    "jsonl_field",
    "tfds_name",
    "tfds_split",
    "max_documents",
    "max_file_bytes",
    "validation_fraction",
)
# Every value data.source may take: the readers below, seqio tasks and mixtures.
SOURCES = ("stdlib", "text", "dir", "jsonl", "tfds", "curated", "task", "mixture")
# What a `data.mixture` component may set besides its rates: its documents, or a seqio task.
COMPONENT_KEYS = (*DOC_KEYS, "task")
# Target size of one document when a single big text file is cut into documents.
TEXT_CHUNK_BYTES = 4096
# Directories of the stdlib that hold no useful text (or binary test fixtures).
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "data"}


@dataclass(frozen=True)
class DocRef:
    """A document that has not been read yet: `key` is stable (used for the split hash)."""

    key: str
    load: Callable[[], str | None]  # None: the document is unreadable and is skipped.


# Updated by the file readers; tests and logs read it. Reset per `iter_source_documents` call.
last_skip_stats = SkipStats()


def _split_of(key: str, validation_fraction: float) -> str:
    """Stable train/validation assignment from a hash of the document key."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "validation" if h / 2**64 < validation_fraction else "train"


def _hash_rank(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _require_path(data_cfg: ml_collections.ConfigDict) -> str:
    path = data_cfg.path
    if not path:
        raise DataError(f"data.source={data_cfg.source} needs a path: set --config.data.path=PATH")
    return path


def _file_refs(root: str, rels: list[str], max_bytes: int, stats: SkipStats) -> list[DocRef]:
    return [
        DocRef(rel, lambda p=os.path.join(root, rel): read_file(p, max_bytes, stats))
        for rel in rels
    ]


def _stdlib_skip_dir(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1] in _STDLIB_SKIP_DIRS


def _stdlib_refs(data_cfg: ml_collections.ConfigDict, stats: SkipStats) -> list[DocRef]:
    root = sysconfig.get_paths()["stdlib"]
    rels = walk(root, globs(data_cfg.include), globs(data_cfg.exclude), _stdlib_skip_dir)
    return _file_refs(root, rels, data_cfg.max_file_bytes, stats)


def _dir_refs(data_cfg: ml_collections.ConfigDict, stats: SkipStats) -> list[DocRef]:
    root = _require_path(data_cfg)
    if not os.path.isdir(root):
        if os.path.exists(root):
            raise DataError(f"data.source=dir needs a directory, got file {root!r}")
        raise missing_path(root)
    rels = walk(root, globs(data_cfg.include), globs(data_cfg.exclude), lambda rel: False)
    return _file_refs(root, rels, data_cfg.max_file_bytes, stats)


def chunk_text(text: str, target_bytes: int = TEXT_CHUNK_BYTES) -> list[str]:
    """Cuts text into pieces of about `target_bytes` at blank lines (else at line ends).

    No character is lost or moved: "".join(chunk_text(t)) == t.
    """
    if len(text.encode("utf-8")) <= target_bytes:
        return [text] if text else []
    lines = text.splitlines(keepends=True)
    chunks, cur, size = [], [], 0
    for i, line in enumerate(lines):
        cur.append(line)
        size += len(line.encode("utf-8"))
        at_blank = i + 1 < len(lines) and not lines[i + 1].strip()
        at_para_end = not line.strip() or at_blank
        if size >= target_bytes and (at_para_end or size >= 2 * target_bytes):
            chunks.append("".join(cur))
            cur, size = [], 0
    if cur:
        chunks.append("".join(cur))
    return chunks


def _text_refs(data_cfg: ml_collections.ConfigDict, stats: SkipStats) -> list[DocRef]:
    """Each file cut into ~4 KB documents. A file that is not UTF-8 is an error when it is the
    only input, else it is skipped with a warning naming it (and counted in `stats`)."""
    paths = expand_paths(_require_path(data_cfg))
    refs = []
    for path in paths:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = decode_utf8(raw, path)
        except DataError as e:
            if len(paths) == 1:
                raise
            stats.not_utf8 += 1
            warn_once(path, f"data: skipped {e}".split(";")[0])
            continue
        base = os.path.basename(path)
        for i, chunk in enumerate(chunk_text(text)):
            refs.append(DocRef(f"{base}#{i}", lambda c=chunk: c))
    if paths and stats.not_utf8 == len(paths):
        raise DataError(f"none of the {len(paths)} files of data.path is valid UTF-8 text")
    return refs


def _parse_jsonl_line(path: str, lineno: int, line: bytes, field: str) -> str:
    """The `field` of one JSONL line, or a DataError naming the file and line (malformed or
    too deeply nested JSON, invalid UTF-8, no such string field)."""
    try:
        obj = jsonio.loads(line.removeprefix(b"\xef\xbb\xbf"))  # a BOM is not content
    except jsonio.JSONError as e:
        raise DataError(f"{path}:{lineno}: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        raise DataError(
            f"{path}:{lineno}: no string field {field!r} (set --config.data.jsonl_field)"
        )
    return obj[field]


def _iter_jsonl(
    data_cfg: ml_collections.ConfigDict, split: str, shard_index: int, num_shards: int
) -> Iterator[str]:
    """JSONL files streamed line by line (they can be far larger than memory); a line's key is
    file:line, and only this shard's lines of the split are parsed."""
    paths = expand_paths(_require_path(data_cfg))
    limit = data_cfg.max_documents or None
    index = position = 0
    for path in paths:
        base = os.path.basename(path)
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named, not a crash
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if limit is not None and index >= limit:
                    return
                index += 1
                if _split_of(f"{base}:{lineno}", data_cfg.validation_fraction) != split:
                    continue
                if position % num_shards == shard_index:
                    yield _parse_jsonl_line(path, lineno, line, data_cfg.jsonl_field)
                position += 1


def _iter_tfds(
    data_cfg: ml_collections.ConfigDict, split: str, shard_index: int, num_shards: int
) -> Iterator[str]:
    """TFDS examples of `tfds_split`, hash-split by example index, text from `text` or the
    first string feature. TFDS has no cheap per-index read, so examples are streamed."""
    tf = tf_cpu_only()
    import tensorflow_datasets as tfds

    if not data_cfg.tfds_name:
        raise DataError("data.source=tfds needs --config.data.tfds_name")
    try:
        ds, info = tfds.load(
            data_cfg.tfds_name, split=data_cfg.tfds_split, shuffle_files=False, with_info=True
        )
    except Exception as e:  # tfds raises many kinds; report one line.
        raise DataError(f"tfds.load({data_cfg.tfds_name!r}) failed: {e}") from None
    feature = "text"
    if feature not in info.features:
        strings = [k for k, v in info.features.items() if getattr(v, "dtype", None) == tf.string]
        if not strings:
            raise DataError(f"TFDS dataset {data_cfg.tfds_name!r} has no string feature")
        feature = strings[0]
    limit = data_cfg.max_documents or None
    position = 0
    for index, example in enumerate(tfds.as_numpy(ds)):
        if limit is not None and index >= limit:
            break
        if _split_of(f"tfds:{index}", data_cfg.validation_fraction) != split:
            continue
        if position % num_shards == shard_index:
            yield example[feature].decode("utf-8", errors="replace")
        position += 1


def content_stamp(data_cfg: ml_collections.ConfigDict) -> str:
    """A hash of the names, sizes and mtimes of the files the source reads (cheap: stat only),
    so caches keyed by it are rebuilt when the data changes."""
    h = hashlib.sha256()
    if data_cfg.source in ("stdlib", "dir"):
        root = sysconfig.get_paths()["stdlib"] if data_cfg.source == "stdlib" else data_cfg.path
        skip = _stdlib_skip_dir if data_cfg.source == "stdlib" else (lambda rel: False)
        inc, exc = globs(data_cfg.include), globs(data_cfg.exclude)
        paths = [os.path.join(root, r) for r in walk(root, inc, exc, skip)] if root else []
    elif data_cfg.source in ("text", "jsonl") and data_cfg.path:
        paths = expand_paths(data_cfg.path)
    elif data_cfg.source == "curated" and data_cfg.path:
        paths = [os.path.join(data_cfg.path, "manifest.json")]
    else:
        paths = []
    for path in paths:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _curated_refs(data_cfg: ml_collections.ConfigDict, stats: SkipStats) -> list[DocRef]:
    """The kept documents of an `lm data run` output directory (cleaned, filtered, deduped)."""
    from lm.curate.output import read_documents

    root = _require_path(data_cfg)
    if not os.path.exists(os.path.join(root, "manifest.json")):
        raise DataError(
            f"{root} has no manifest.json: is --config.data.path an `lm data run` output?"
        )
    return [DocRef(f"curated:{d['id']}", lambda t=d["text"]: t) for d in read_documents(root)]


_REF_BUILDERS = {
    "stdlib": _stdlib_refs,
    "dir": _dir_refs,
    "text": _text_refs,
    "curated": _curated_refs,
}
_STREAMS = {"tfds": _iter_tfds, "jsonl": _iter_jsonl}


def split_refs(
    data_cfg: ml_collections.ConfigDict, split: str, stats: SkipStats | None = None
) -> list[DocRef]:
    """The split's document references in order, before sharding (cheap: nothing is read)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    builder = _REF_BUILDERS.get(data_cfg.source)
    if builder is None:
        raise DataError(
            f"--config.data.source={data_cfg.source!r} has no document reader here; "
            f"expected one of {sorted([*_REF_BUILDERS, *_STREAMS])}, task or mixture"
        )
    refs = builder(data_cfg, stats if stats is not None else SkipStats())
    if data_cfg.max_documents:
        refs = refs[: data_cfg.max_documents]
    frac = data_cfg.validation_fraction
    assigned = [_split_of(r.key, frac) for r in refs]
    if frac > 0 and len(refs) >= 2 and "validation" not in assigned:
        # A small corpus where no document hashed into validation: the lowest hash moves
        # there, so a validation split always exists when it was asked for.
        lowest = min(range(len(refs)), key=lambda i: _hash_rank(refs[i].key))
        assigned[lowest] = "validation"
    return [r for r, s in zip(refs, assigned) if s == split]


def iter_source_documents(
    data_cfg: ml_collections.ConfigDict, split: str, shard_index: int = 0, num_shards: int = 1
) -> Iterator[str]:
    """Yields this shard's documents of `split` of ONE document source, in a deterministic order.

    Host `shard_index` of `num_shards` gets every num_shards-th document of the split, chosen
    before any file is read; the shards partition the split. Unreadable files are skipped and
    counted (`last_skip_stats`). Mixtures and source=task: lm.data.documents.iter_documents.
    """
    global last_skip_stats
    if not 0 <= shard_index < num_shards:
        raise DataError(f"shard_index {shard_index} out of range for {num_shards} shards")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if data_cfg.source in _STREAMS:  # Streamed: no cheap per-document reads.
        yield from _STREAMS[data_cfg.source](data_cfg, split, shard_index, num_shards)
        return
    stats = SkipStats()
    last_skip_stats = stats
    refs = split_refs(data_cfg, split, stats)
    for ref in refs[shard_index::num_shards]:
        text = ref.load()
        if text:
            yield text
    if stats.not_utf8 or stats.too_big or stats.unreadable:
        logging.info(
            "data: %s split: skipped %d non-UTF-8, %d unreadable or not regular and %d "
            "oversized files (max_file_bytes=%d)",
            split,
            stats.not_utf8,
            stats.unreadable,
            stats.too_big,
            data_cfg.max_file_bytes,
        )
