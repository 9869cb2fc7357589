"""CRC32C checksums of a checkpoint's files, recorded once it is written, verified on restore.

A flipped bit in an array file is not an error to tensorstore: the checkpoint restores, with
altered weights. So the primary host records, for every file of the checkpoint's `state/` item
and every host's data-iterator state, its size and CRC32C in `<step>/checksums.json`, and a
restore compares them before orbax reads a byte.

Cost: local files are hashed while streaming them in 4 MiB blocks (CRC32C is hardware
accelerated, several GB/s, so the disk read dominates). Objects in a bucket are not downloaded:
GCS computes every object's CRC32C when it is written and reports it in the object's metadata,
so recording and verifying one costs a metadata request (GCS itself guards the bytes at rest).
"""

from __future__ import annotations

import base64
import json

import google_crc32c

from lm import jsonio, storage

FILE = "checksums.json"
ITEM = "state"  # the orbax item whose files are hashed
BLOCK = 4 << 20


class ChecksumMismatch(Exception):
    """A checkpoint file differs from what was recorded when it was written (one line)."""


def file_crc32c(path: str) -> tuple[int, int]:
    """(size, CRC32C) of one file: from the object's metadata in a bucket, else streamed."""
    if storage.is_remote(path):
        fs, bare = _fs(path)
        return _object_crc32c(fs, bare, fs.info(bare))
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            crc = google_crc32c.extend(crc, block)
            size += len(block)
    return size, crc


def tree_crc32c(root: str) -> dict[str, tuple[int, int]]:
    """`relative/path` -> (size, CRC32C) of every file under `root`; in a bucket from one
    listing of the objects' metadata (no download, no request per object)."""
    if not storage.is_remote(root):
        return {rel: file_crc32c(storage.join(root, rel)) for rel in storage.relative_files(root)}
    fs, bare = _fs(root)
    bare = bare.rstrip("/")
    found = fs.find(bare, detail=True) if fs.exists(bare) else {}
    return {
        name[len(bare) + 1 :]: _object_crc32c(fs, name, info)
        for name, info in found.items()
        if info.get("type", "file") == "file"
    }


def _fs(path: str):
    import fsspec

    storage.path(path)  # applies the gs:// settings (emulator, no listing cache) first
    return fsspec.core.url_to_fs(path)


def _object_crc32c(fs, bare: str, info: dict) -> tuple[int, int]:
    """GCS reports each object's CRC32C (base64, big-endian); else the object is read."""
    crc = info.get("crc32c")
    if crc:
        return int(info["size"]), int.from_bytes(base64.b64decode(crc), "big")
    data = fs.cat_file(bare)
    return len(data), google_crc32c.value(data)


def record(step_dir: str, data_files: dict[str, str]) -> dict:
    """Hashes every file under `<step_dir>/state` and the given data-state files
    (name -> path) and writes `<step_dir>/checksums.json`; returns what it wrote."""
    state = tree_crc32c(storage.join(step_dir, ITEM))
    files = {f"{ITEM}/{rel}": v for rel, v in sorted(state.items())}
    data = {name: file_crc32c(p) for name, p in sorted(data_files.items())}
    sums = {"algorithm": "crc32c", "files": files, "data": data}
    storage.write_text(storage.join(step_dir, FILE), json.dumps(sums, indent=0))
    return sums


def load(step_dir: str) -> dict | None:
    """The recorded checksums of a checkpoint, or None for one written before they existed.
    An unreadable checksums file means a damaged checkpoint (ChecksumMismatch)."""
    path = storage.join(step_dir, FILE)
    if not storage.exists(path):
        return None
    try:
        sums = jsonio.loads(storage.read_bytes(path))
        if not isinstance(sums.get("files"), dict) or not isinstance(sums.get("data"), dict):
            raise ValueError("no files")
    except (ValueError, AttributeError) as e:
        raise ChecksumMismatch(f"{FILE} is unreadable ({e})") from e
    return sums


def verify(step_dir: str, sums: dict, data_files: dict[str, str]) -> None:
    """Raises ChecksumMismatch naming the first file that is missing or differs from `sums`
    (the state files, then this host's data-state files in `data_files`: name -> path)."""
    have = {}
    if sums["files"]:
        state = tree_crc32c(storage.join(step_dir, ITEM))
        have = {f"{ITEM}/{rel}": v for rel, v in state.items()}
    for name, path in data_files.items():
        if name in sums["data"] and storage.exists(path):
            have[name] = file_crc32c(path)
    wanted = list(sums["files"].items())
    wanted += [(n, sums["data"][n]) for n in data_files if n in sums["data"]]
    for name, (size, crc) in wanted:
        if name not in have:
            raise ChecksumMismatch(f"{name} is missing")
        have_size, have_crc = have[name]
        if have_size != size:
            raise ChecksumMismatch(f"{name} has {have_size} bytes, {size} were written")
        if have_crc != crc:
            raise ChecksumMismatch(f"{name} does not match its CRC32C (a changed byte)")
