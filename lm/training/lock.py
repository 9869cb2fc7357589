"""One run per workdir: `lm train` and `lm finetune` hold `<workdir>/lock.json` while they run.

Two runs on one workdir would splice each other's config, checkpoints and metrics (the second
"resumes" from a checkpoint the first is still writing), so a second run stops at once with a
one-line `WorkdirLocked` naming the owner: host, pid, command and since when. The lock names
its owner in JSON and is released (deleted) when the run ends: normally, by an exception, or
by SIGTERM/SIGINT preemption (those end in `Preempted`, an exception). On a pod only process 0
holds it (the workdir is shared); every process stops if it is taken.

A run killed with SIGKILL cannot release it, so a stale lock is detected and taken over with a
warning:
- local workdir: the lock file is also `flock`ed by its owner, and the kernel drops a flock
  when its process dies, so a lock file nobody flocks was left by a dead run (no pid-reuse
  guessing). A lock written on another host (a shared filesystem) counts as held while its
  heartbeat is fresh.
- gs:// workdir: created with a generation precondition (only one creator wins); its owner
  rewrites the heartbeat every HEARTBEAT_S seconds, and a lock whose heartbeat is older than
  STALE_S, or whose owner is a dead process on this host, is stale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator

from lm import distributed, jsonio, storage
from lm.errors import LMError

LOCK_FILE = "lock.json"
HEARTBEAT_S = 30.0
STALE_S = 180.0  # six missed heartbeats


class WorkdirLocked(LMError):
    """Another live run owns the workdir."""


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), which tells a reused
    pid from the original process; None where /proc is not available."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` (started at `start`) still runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    return start is None or _process_start(pid) in (None, start)


def command_line() -> str:
    """This process's command as a user typed it (`lm train ...`)."""
    argv = list(sys.argv)
    if argv and (argv[0].endswith(("cli.py", "/lm")) or argv[0] == "lm"):
        argv[0] = "lm"
    return " ".join(argv)


def describe(owner: dict) -> str:
    """`pid 12 on host-a (`lm train ...`), since 2025-01-01 10:00:00 UTC`."""
    if not owner:
        return "an unknown run (its lock file is empty)"
    command = str(owner.get("command", "?"))
    command = command if len(command) <= 160 else command[:157] + "..."
    return (
        f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} (`{command}`), "
        f"since {owner.get('since', '?')}"
    )


def _parse(raw: bytes) -> dict:
    try:
        owner = jsonio.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


class WorkdirLock:
    """`<workdir>/lock.json`, held from `acquire()` to `release()` by this process."""

    def __init__(self, workdir: str, command: str | None = None):
        self.workdir = storage.absolute(workdir)
        self.path = storage.join(self.workdir, LOCK_FILE)
        self.remote = storage.is_remote(self.workdir)
        now = time.time()
        self.owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "start": _process_start(os.getpid()),
            "command": command or command_line(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now)),
            "heartbeat": now,
            "token": uuid.uuid4().hex,
        }
        self._fd: int | None = None
        self._created_dir = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- whose lock is it ------------------------------------------------------------------

    def _stale_because(self, owner: dict, *, flock_free: bool) -> str | None:
        """Why `owner`'s lock no longer counts (None: it is held)."""
        if owner.get("host") == self.owner["host"] and isinstance(owner.get("pid"), int):
            if flock_free or not _alive(owner["pid"], owner.get("start")):
                return "that process is no longer running"
            return None
        age = time.time() - float(owner.get("heartbeat") or 0)
        if age > STALE_S:
            return f"no heartbeat for {age / 60:.0f} min"
        return None

    def _locked(self, owner: dict) -> WorkdirLocked:
        return WorkdirLocked(
            f"{self.workdir} is in use by another run: {describe(owner)}; wait for it to "
            "finish or stop it, or use another --workdir"
        )

    def _took_over(self, owner: dict, why: str) -> None:
        logging.warning(
            "took over the lock of %s left by a run that ended without releasing it (%s): %s",
            self.workdir,
            why,
            describe(owner),
        )

    def _payload(self) -> bytes:
        self.owner["heartbeat"] = time.time()
        return json.dumps(self.owner).encode()

    # -- local: flock + the owner's description --------------------------------------------

    def _acquire_local(self) -> None:
        import fcntl

        self._created_dir = not os.path.isdir(self.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _parse(os.pread(fd, 1 << 16, 0))
                os.close(fd)
                raise self._locked(owner) from None
            try:  # a releasing owner unlinks the file: make sure ours is the one at the path
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _parse(os.pread(fd, 1 << 16, 0))
        if previous:
            why = self._stale_because(previous, flock_free=True)
            if why is None:  # written on another host sharing this filesystem, still beating
                os.close(fd)
                raise self._locked(previous)
            self._took_over(previous, why)
        self._fd = fd
        self._write_local()

    def _write_local(self) -> None:
        data = self._payload()
        os.pwrite(self._fd, data, 0)
        os.ftruncate(self._fd, len(data))
        os.fsync(self._fd)

    def _release_local(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still flocked: nobody takes over a half-released lock
        os.close(self._fd)
        self._fd = None
        if self._created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.workdir)  # only if the run wrote nothing there

    # -- gs://: create-if-absent + heartbeat -----------------------------------------------

    def _fs(self):
        import fsspec

        storage.path(self.path)  # applies the gs:// settings first
        return fsspec.core.url_to_fs(self.path)

    def _acquire_remote(self) -> None:
        fs, bare = self._fs()
        for _ in range(5):
            try:
                fs.pipe_file(bare, self._payload(), mode="create")  # ifGenerationMatch=0
                return
            except FileExistsError:
                pass
            try:
                info, raw = fs.info(bare), fs.cat_file(bare)
            except FileNotFoundError:
                continue  # released meanwhile
            owner = _parse(raw)
            why = self._stale_because(owner, flock_free=False)
            if why is None:
                raise self._locked(owner)
            self._took_over(owner, why)
            bucket, key = bare.split("/", 1)
            with contextlib.suppress(OSError):  # only that generation: not a fresh owner's
                fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=info["generation"])
        raise WorkdirLocked(f"{self.workdir}: could not take its lock (it keeps changing)")

    def _beat_remote(self) -> None:
        fs, bare = self._fs()
        if _parse(fs.cat_file(bare)).get("token") != self.owner["token"]:
            logging.warning("the lock of %s was taken over by another run", self.workdir)
            self._stop.set()
            return
        fs.pipe_file(bare, self._payload())

    def _release_remote(self) -> None:
        fs, bare = self._fs()
        with contextlib.suppress(FileNotFoundError):
            if _parse(fs.cat_file(bare)).get("token") == self.owner["token"]:
                fs.rm_file(bare)

    # -- both ------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Takes the lock (a stale one with a warning) or raises WorkdirLocked."""
        self._acquire_remote() if self.remote else self._acquire_local()
        self._thread = threading.Thread(target=self._heartbeat, name="lm-lock", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._beat_remote() if self.remote else self._write_local()
            except Exception as e:  # noqa: BLE001 - a missed beat is not fatal
                logging.warning("could not refresh the lock of %s: %s", self.workdir, e)

    def release(self) -> None:
        """Deletes the lock (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.remote:
            self._release_remote()
        elif self._fd is not None:
            self._release_local()


_held: dict[str, list] = {}  # workdir -> [WorkdirLock, depth] held by this process


@contextlib.contextmanager
def hold(workdir: str, command: str | None = None) -> Iterator[None]:
    """Holds the workdir's lock for the block (process 0 of a pod; re-entrant in a process,
    e.g. `lm finetune --method=lm` running `lm train`'s loop). Every process raises
    WorkdirLocked if it is taken."""
    import jax

    key = storage.absolute(workdir)
    error, entered = None, False
    if jax.process_index() == 0:
        try:
            if key not in _held:
                lock = WorkdirLock(key, command)
                lock.acquire()
                _held[key] = [lock, 0]
            _held[key][1] += 1
            entered = True
        except WorkdirLocked as e:
            error = e
    if distributed.any_process(error is not None):
        raise error or WorkdirLocked(f"{key} is in use by another run (see process 0's error)")
    try:
        yield
    finally:
        if entered:
            _held[key][1] -= 1
            if not _held[key][1]:
                _held.pop(key)[0].release()
