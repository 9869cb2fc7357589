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

import fnmatch
import glob
import hashlib
import logging
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import ml_collections

from lm import jsonio, storage
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


@dataclass
class SkipStats:
    """Counts of files skipped while reading (non-UTF-8, over max_file_bytes, unreadable or not
    a regular file), and "path at byte N" for the first few that are not UTF-8."""

    not_utf8: int = 0
    too_big: int = 0
    unreadable: int = 0
    not_utf8_examples: list[str] = field(default_factory=list)


# Updated by the file readers; tests and logs read it. Reset per `iter_source_documents` call.
last_skip_stats = SkipStats()
# Files already named in a warning: the tokenizer and every packed split read the same files,
# and one warning per file is enough.
_WARNED: set[str] = set()
_TF = None


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 points at /dev/null inside the block (C++ libraries write there
    directly, past Python's sys.stderr)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def tf_cpu_only():
    """Imports TensorFlow quietly with GPUs hidden (JAX owns the accelerators); returns it.

    Quietly: TensorFlow 2.19+ writes its start-up lines (oneDNN, "Could not find cuda drivers",
    "failed call to cuInit") to stderr before its log level applies, whatever
    TF_CPP_MIN_LOG_LEVEL says, so they go to /dev/null while TF loads and hides the GPUs; an
    import error still raises. Must run before TF's first op; later calls are no-ops.
    """
    global _TF
    if _TF is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with _stderr_silenced():
            import tensorflow as tf

            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:  # Devices already initialized by an earlier TF op.
                pass
        _TF = tf
    return _TF


def _split_of(key: str, validation_fraction: float) -> str:
    """Stable train/validation assignment from a hash of the document key."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "validation" if h / 2**64 < validation_fraction else "train"


def _hash_rank(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _globs(text: str) -> list[str]:
    return [g.strip() for g in text.split(",") if g.strip()]


def _matches(rel: str, patterns: list[str]) -> bool:
    base = os.path.basename(rel)
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(base, p) for p in patterns)


def _require_path(data_cfg: ml_collections.ConfigDict) -> str:
    path = data_cfg.path
    if not path:
        raise DataError(f"data.source={data_cfg.source} needs a path: set --config.data.path=PATH")
    return path


def _missing(path: str) -> DataError:
    return DataError(f"data path {path!r} does not exist (set by --config.data.path)")


def decode_utf8(raw: bytes, name: str) -> str:
    """`raw` as UTF-8 text, or a DataError naming `name` and the byte offset of the first
    invalid byte. Never a guessed encoding: text decoded as cp1252 by mistake would be trained
    on as mojibake; `lm data run` detects legacy encodings and reports what it converted."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{name}: not valid UTF-8 at byte {e.start} (0x{raw[e.start]:02x}); convert it to "
            "UTF-8 first (e.g. iconv, or `lm data run`, which detects legacy encodings)"
        ) from None


def _read_file(path: str, max_bytes: int, stats: SkipStats) -> str | None:
    """The file's text, or None (counted in `stats`) if it is too big, not UTF-8, unreadable or
    not a regular file (a FIFO would block the read forever)."""
    try:
        if not storage.is_regular_file(path):
            stats.unreadable += 1
            return None
        if max_bytes and os.path.getsize(path) > max_bytes:
            stats.too_big += 1
            return None
        with open(path, "rb") as f:
            raw = f.read()
        return decode_utf8(raw, path)
    except DataError as e:
        stats.not_utf8 += 1
        if len(stats.not_utf8_examples) < 3:
            stats.not_utf8_examples.append(str(e).split(";")[0].replace(": not valid UTF-8", ""))
        _warn_once(path, f"data: skipped {e}".split(";")[0])
        return None
    except OSError:
        stats.unreadable += 1
        return None


def _warn_once(path: str, message: str) -> None:
    if path not in _WARNED:
        _WARNED.add(path)
        logging.warning("%s", message)


def _file_refs(root: str, rels: list[str], max_bytes: int, stats: SkipStats) -> list[DocRef]:
    return [
        DocRef(rel, lambda p=os.path.join(root, rel): _read_file(p, max_bytes, stats))
        for rel in rels
    ]


def _walk(root: str, include: list[str], exclude: list[str], skip_dir) -> list[str]:
    """Sorted relative paths under `root` matching include and not exclude."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirnames[:] = sorted(
            d for d in dirnames if not skip_dir(os.path.join(rel_dir, d).replace(os.sep, "/"))
        )
        for name in filenames:
            rel = os.path.join(rel_dir, name).replace(os.sep, "/")
            if include and not _matches(rel, include):
                continue
            if exclude and _matches(rel, exclude):
                continue
            rels.append(rel)
    return sorted(rels)


def _stdlib_skip_dir(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1] in _STDLIB_SKIP_DIRS


def _stdlib_refs(data_cfg: ml_collections.ConfigDict, stats: SkipStats) -> list[DocRef]:
    root = sysconfig.get_paths()["stdlib"]
    rels = _walk(root, _globs(data_cfg.include), _globs(data_cfg.exclude), _stdlib_skip_dir)
    return _file_refs(root, rels, data_cfg.max_file_bytes, stats)


def _dir_refs(data_cfg: ml_collections.ConfigDict, stats: SkipStats) -> list[DocRef]:
    root = _require_path(data_cfg)
    if not os.path.isdir(root):
        if os.path.exists(root):
            raise DataError(f"data.source=dir needs a directory, got file {root!r}")
        raise _missing(root)
    rels = _walk(root, _globs(data_cfg.include), _globs(data_cfg.exclude), lambda rel: False)
    return _file_refs(root, rels, data_cfg.max_file_bytes, stats)


def _expand_paths(spec: str) -> list[str]:
    """Comma-separated files or globs -> sorted existing files; a missing one is an error, and
    so is one that is not a regular file (a FIFO or device would block the reader)."""
    out = []
    for item in _globs(spec):
        if any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise _missing(item)
            out.extend(found)
        elif os.path.isdir(item):
            raise DataError(f"{item!r} is a directory: use --config.data.source=dir")
        elif os.path.lexists(item):
            out.append(item)
        else:
            raise _missing(item)
    for path in out:
        storage.require_regular_file(path)
    return out


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
    paths = _expand_paths(_require_path(data_cfg))
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
            _warn_once(path, f"data: skipped {e}".split(";")[0])
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
    paths = _expand_paths(_require_path(data_cfg))
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
        inc, exc = _globs(data_cfg.include), _globs(data_cfg.exclude)
        paths = [os.path.join(root, r) for r in _walk(root, inc, exc, skip)] if root else []
    elif data_cfg.source in ("text", "jsonl") and data_cfg.path:
        paths = _expand_paths(data_cfg.path)
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
