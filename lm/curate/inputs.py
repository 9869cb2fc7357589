"""Inputs: the configured paths (local or `gs://`, globs, directories, TFDS names) expanded on
the driver into the list of files the Beam workers read (sources.py `read_input`).

An input that cannot be listed (a symlink loop, a locked directory) is kept in the list with
its reason, so it ends as a counted reject instead of vanishing; a path that does not exist is
a one-line ConfigError.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import posixpath
import sysconfig
from typing import Any

from lm import storage
from lm.curate.clean import escaped_name, printable_name
from lm.curate.sources import CONTAINER_EXTENSIONS, _errno_name, _tfds_data_dir
from lm.errors import ConfigError


def _globs(value: str) -> list[str]:
    return [g.strip() for g in value.split(",") if g.strip()]


def _matches(rel: str, patterns: list[str]) -> bool:
    name = posixpath.basename(rel)
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _wanted(rel: str, include: list[str], exclude: list[str]) -> bool:
    if include and not _matches(rel, include):
        return False
    return not (exclude and (_matches(rel, exclude) or _matches("/" + rel, exclude)))


def _walk_local(root: str, include: list[str], exclude: list[str]) -> list[tuple]:
    """(path, path relative to root[, reason]) of files under root, sorted for stable ids.

    Directory symlinks are followed, but a link back into its own ancestry (a loop) or to a
    directory already walked becomes one input rejected with that reason, and so does a
    directory that cannot be listed (os.walk would skip both silently)."""
    out: list[tuple] = []
    seen = {os.path.realpath(root)}

    def unlisted(e: OSError) -> None:
        rel = os.path.relpath(e.filename, root) if e.filename else "."
        out.append((e.filename or root, rel, f"unreadable_dir:{_errno_name(e)}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted, followlinks=True):
        dirnames.sort()
        here = os.path.realpath(dirpath)
        seen.add(here)
        for name in list(dirnames):
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                continue
            real = os.path.realpath(path)
            if real in seen or here == real or here.startswith(real + os.sep):
                dirnames.remove(name)
                loop = here == real or here.startswith(real + os.sep)
                reason = "symlink_loop" if loop else "symlink_duplicate_dir"
                out.append((path, os.path.relpath(path, root), reason))
            else:
                seen.add(real)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if _wanted(rel, include, exclude):
                out.append((path, rel))
    return out


def _walk_remote(root: str, include: list[str], exclude: list[str]) -> list[tuple]:
    root = root.rstrip("/")
    rels = storage.relative_files(root)
    return [(f"{root}/{r}", r) for r in rels if _wanted(r, include, exclude)]


def _expand_tfds(src: dict[str, Any]) -> list[tuple]:
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


def _match_root(root: str) -> list[str]:
    """The paths one configured root names (a glob may name several); ConfigError if none."""
    if storage.is_remote(root):
        if glob.has_magic(root):
            parts = root.split("/")
            first = next(i for i, p in enumerate(parts) if glob.has_magic(p))
            hits = [os.fspath(p) for p in storage.path("/".join(parts[:first])).glob(
                "/".join(parts[first:]))]  # fmt: skip
        else:
            hits = [root.rstrip("/")] if storage.exists(root) else []
        if not hits:
            raise ConfigError(f"input path not found: {root}")
        return sorted(hits)
    hits = sorted(glob.glob(root)) if glob.has_magic(root) else [root]
    if not hits or not all(os.path.exists(m) for m in hits):
        raise ConfigError(f"input path not found: {root}")
    return [os.path.abspath(m) for m in hits]


def expand_inputs(src: dict[str, Any]) -> list[tuple]:
    """(path, relative name) pairs to read - or (path, relative name, reason) for an input that
    cannot be read (a loop, an unlisted directory) - or raises ConfigError for a missing input."""
    kind = src["type"]
    include, exclude = _globs(src["include"]), _globs(src["exclude"])
    if kind == "tfds":
        return _expand_tfds(src)
    if kind == "stdlib":
        roots = [sysconfig.get_paths()["stdlib"]]
    else:
        roots = [p.strip() for p in src["path"].split(",") if p.strip()]
        if not roots:
            raise ConfigError(f"source.type={kind} needs --config.source.path=PATH")
    if kind not in ("stdlib", "dir", "text", *CONTAINER_EXTENSIONS):
        raise ConfigError(
            f"unknown source.type {kind!r}; use stdlib, dir, text, jsonl, parquet, warc or tfds"
        )
    matches = [m for root in roots for m in _match_root(root)]
    remote = storage.is_remote(matches[0])
    if any(storage.is_remote(m) != remote for m in matches):
        raise ConfigError("--config.source.path mixes local and gs:// paths; use one kind")
    isdir = {m: (storage.isdir(m) if remote else os.path.isdir(m)) for m in matches}
    # Ids are paths relative to one base, so they stay unique across several roots: a single
    # directory is its own base; otherwise the common parent of everything matched.
    scheme = matches[0].split("://", 1)[0] + "://" if remote else ""
    bare = [m[len(scheme) :] for m in matches]
    pathmod = posixpath if remote else os.path
    if len(matches) == 1 and isdir[matches[0]]:
        base = bare[0]
    else:
        base = pathmod.commonpath(
            [b if isdir[m] else pathmod.dirname(b) for m, b in zip(matches, bare)]
        )
        if len(matches) > 1 and all(isdir.values()) and base in bare:
            base = pathmod.dirname(base)
    found: list[tuple] = []
    walk = _walk_remote if remote else _walk_local
    for match, b in zip(matches, bare):
        if isdir[match]:
            pats = include
            if kind in CONTAINER_EXTENSIONS:
                pats = ["*" + e for e in CONTAINER_EXTENSIONS[kind]]
            for path, _, *why in walk(match, pats, exclude):
                found.append((path, pathmod.relpath(path[len(scheme) :], base), *why))
        else:
            found.append((match, pathmod.relpath(b, base)))
    found = list(dict.fromkeys(found))  # a file named twice (two globs) is read once
    if src["max_documents"] and kind in ("stdlib", "dir", "text"):
        found = found[: src["max_documents"]]
    return [_encodable(*entry) for entry in found]


def _encodable(path: str, rel: str, *why: str) -> tuple:
    """A file name that is not valid UTF-8 (os.walk hands it over with surrogate escapes) cannot
    cross a Beam coder as a string: its path travels as bytes. The relative name (the id) is
    `escaped_name(rel)`: bad bytes written as `\\xNN`, backslashes doubled, so it stays unique."""
    if printable_name(path) != path:
        return (os.fsencode(path), escaped_name(rel), *why)
    return (path, escaped_name(rel), *why)
