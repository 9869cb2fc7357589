"""One storage layer for local paths and `gs://` buckets: every read and write of a workdir, a
tokenizer, a data cache or packed data goes through these functions.

Built on `etils.epath`, the path library orbax-checkpoint already uses, so checkpoints and
everything else resolve a `gs://` path the same way. epath is pinned to its fsspec backend
(gcsfs) rather than `tf.io.gfile`: the trainer process never imports TensorFlow, and gcsfs
honours `STORAGE_EMULATOR_HOST`, so the tests run the same code against a GCS emulator on
127.0.0.1. Object stores have no rename or append: `write_*` puts a whole object (atomic on GCS;
a temporary file and `os.replace` locally), and `rename` of a directory is copy-then-delete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator

# Before the first epath import anywhere: gs:// through fsspec/gcsfs, never tf.io.gfile.
os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402

from lm.errors import DataError  # noqa: E402

PathLike = str | os.PathLike


def _configure_gcs() -> None:
    """Settings for every gs:// client, applied before the first remote access.

    gcsfs keeps no directory listings: other processes (tensorstore, other hosts, the data-cache
    child) write the same bucket, and a cached listing would hide their files. With
    `STORAGE_EMULATOR_HOST` set (a local GCS emulator), the emulator is also used by tensorstore
    (orbax checkpoints), requests are anonymous, and gcsfs's gRPC bucket-type probe, which
    emulators do not answer (a 60 s stall per bucket), is off.
    """
    import fsspec

    gcs = fsspec.config.conf.setdefault("gcs", {})
    gcs.setdefault("use_listings_cache", False)
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host not in ("", "default"):
        url = host if "://" in host else f"http://{host}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        gcs.setdefault("token", "anon")


def is_remote(path: PathLike) -> bool:
    """True for `scheme://...` paths (gs://, s3://, ...)."""
    return "://" in os.fspath(path)


def path(p: PathLike) -> epath.Path:
    """An `epath.Path` (pathlib-like; works for local and gs:// alike)."""
    if is_remote(p):
        _configure_gcs()
    return epath.Path(p)


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` as a string; keeps the `gs://` prefix intact."""
    return os.fspath(path(base).joinpath(*parts))


def absolute(p: PathLike) -> str:
    """An absolute local path, or the remote path unchanged."""
    return os.fspath(p) if is_remote(p) else os.path.abspath(p)


def exists(p: PathLike) -> bool:
    return path(p).exists()


def isdir(p: PathLike) -> bool:
    return path(p).is_dir()


def makedirs(p: PathLike) -> None:
    path(p).mkdir(parents=True, exist_ok=True)


def listdir(p: PathLike) -> list[str]:
    """Names of the entries directly under `p` (sorted; [] if it does not exist)."""
    d = path(p)
    if not d.exists():
        return []
    return sorted(child.name for child in d.iterdir())


def is_regular_file(p: PathLike) -> bool:
    """True for a regular file (following symlinks); False for a directory, FIFO, socket or
    device, which would block or fail a reader. Objects in a bucket are always regular."""
    if is_remote(p):
        return path(p).is_file()
    try:
        return stat.S_ISREG(os.stat(p).st_mode)
    except OSError:
        return False


def require_regular_file(p: PathLike) -> None:
    """`DataError` naming `p` unless it is a regular file (missing: `FileNotFoundError`)."""
    if is_remote(p) or is_regular_file(p):
        return
    if not os.path.lexists(p):
        raise FileNotFoundError(f"{p} not found")
    raise DataError(f"{p} is not a regular file ({_file_kind(p)}); point the command at a file")


def _file_kind(p: PathLike) -> str:
    try:
        mode = os.stat(p).st_mode
    except OSError as e:
        return f"unreadable: {e.strerror}"
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_bytes(p: PathLike) -> bytes:
    """The whole file; refuses FIFOs and devices (opening one blocks forever) with a one-line
    `DataError`."""
    require_regular_file(p)
    return path(p).read_bytes()


def read_text(p: PathLike) -> str:
    require_regular_file(p)
    return path(p).read_text(encoding="utf-8")


def write_bytes(p: PathLike, data: bytes) -> None:
    """Writes the whole file at once: readers never see a partial file."""
    if is_remote(p):
        path(p).write_bytes(data)  # one object upload; buckets have no directories to create
        return
    directory = os.path.dirname(os.path.abspath(p))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide run files from the group
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask is process-wide, so not per write


def write_text(p: PathLike, text: str) -> None:
    write_bytes(p, text.encode("utf-8"))


def remove(p: PathLike) -> None:
    """Deletes a file or a whole directory tree; no error if it is missing."""
    target = path(p)
    if not target.exists():
        return
    if target.is_dir():
        target.rmtree()
    else:
        target.unlink()


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copies the directory `src` to `dst` (any mix of local and remote)."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copytree(src, dst, dirs_exist_ok=True)
        return
    for rel in relative_files(src):
        target = path(join(dst, rel))
        if not is_remote(dst):
            target.parent.mkdir(parents=True, exist_ok=True)
        path(join(src, rel)).copy(target, overwrite=True)


def relative_files(root: PathLike) -> list[str]:
    """Every file under `root`, recursively, as sorted `/`-separated paths relative to it."""
    d = path(root)
    if not d.exists():
        return []

    def bare(x: PathLike) -> str:  # fsspec's walk yields remote paths without the scheme
        return os.fspath(x).split("://", 1)[-1].rstrip("/")

    out = []
    for directory, _dirs, files in d.walk():
        rel_dir = os.path.relpath(bare(directory), bare(d))
        for name in files:
            out.append(name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/"))
    return sorted(out)


def walk_files(root: PathLike) -> Iterator[str]:
    """Every file under `root`, recursively, as full paths (sorted)."""
    for rel in relative_files(root):
        yield join(root, rel)


def publish_dir(tmp: PathLike, final: PathLike) -> bool:
    """Moves a finished directory `tmp` to `final`; False if `final` already existed (another
    process finished first: its copy is kept and `tmp` is deleted). Local moves are one atomic
    rename; remote ones copy then delete, so readers must look for a marker file written last."""
    if exists(final):
        remove(tmp)
        return False
    if not is_remote(tmp) and not is_remote(final):
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        return True
    copy_tree(tmp, final)
    remove(tmp)
    return True


def _fingerprint(p: PathLike) -> str:
    """A hash of the remote file's or tree's object metadata (names, sizes, generations):
    it changes whenever the object at `p` is replaced, so a stale download is never reused."""
    import fsspec

    fs, bare = fsspec.core.url_to_fs(os.fspath(p))
    infos = fs.find(bare, detail=True) if fs.isdir(bare) else {bare: fs.info(bare)}
    keys = ("name", "size", "generation", "md5Hash", "crc32c", "updated", "mtime")
    text = repr(sorted((n, [str(i.get(k)) for k in keys]) for n, i in infos.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def local_copy(p: PathLike, cache_root: PathLike | None = None) -> str:
    """A local path holding the file or directory `p`: `p` itself when local, else a copy
    downloaded once per version of the object under `cache_root` (default: the system temp
    dir). For readers that only open local files (SentencePiece, ArrayRecord)."""
    if not is_remote(p):
        return os.fspath(p)
    _configure_gcs()
    root = os.fspath(cache_root or os.path.join(tempfile.gettempdir(), "lm-remote-cache"))
    remote = os.fspath(p).rstrip("/")
    name = remote.rsplit("/", 1)[-1]
    local = os.path.join(root, remote.replace("://", "/", 1), _fingerprint(remote), name)
    if os.path.exists(local):
        return local
    os.makedirs(os.path.dirname(local), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(local))
    target = os.path.join(staging, name)
    if isdir(remote):
        copy_tree(remote, target)
    else:
        path(remote).copy(path(target))
    try:
        os.rename(target, local)
    except OSError:
        pass  # another process downloaded it first
    shutil.rmtree(staging, ignore_errors=True)
    return local
