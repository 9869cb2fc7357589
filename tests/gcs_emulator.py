"""A GCS emulator on 127.0.0.1 for tests: gcp-storage-emulator (pure Python, in memory) in a
child process, with one bucket.

Only `STORAGE_EMULATOR_HOST` is set: `lm.storage` derives the rest from it (tensorstore's
`TENSORSTORE_GCS_HTTP_URL` for orbax checkpoints, anonymous gcsfs requests, no gRPC bucket-type
probe), so the trainer needs no other setting to run against the emulator.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

BUCKET = "lm-test-bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Emulator:
    url: str  # http://127.0.0.1:PORT
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        """What a child process needs on top of its environment to use the emulator."""
        return {"STORAGE_EMULATOR_HOST": self.url}

    def fresh(self, name: str = "run") -> str:
        """A new, empty `gs://` directory in the bucket."""
        return f"gs://{self.bucket}/{name}-{uuid.uuid4().hex[:8]}"

    def fs(self):
        """A gcsfs client of the emulator (anonymous, no listing cache) for assertions."""
        from lm import storage

        storage.path(f"gs://{self.bucket}")  # applies the emulator settings before gcsfs loads
        import gcsfs

        return gcsfs.GCSFileSystem(token="anon", use_listings_cache=False, skip_instance_cache=True)


@contextlib.contextmanager
def running_emulator(bucket: str = BUCKET, timeout: float = 30.0) -> Iterator[Emulator]:
    """Starts the emulator, waits until it serves the bucket, and stops it on exit."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-c",
        "import sys; from gcp_storage_emulator.__main__ import main; sys.exit(main())",
        "start",
        "--host=127.0.0.1",
        f"--port={port}",
        "--in-memory",
        f"--default-bucket={bucket}",
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the GCS emulator did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        yield Emulator(url=url, bucket=bucket)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def emulator_environment(emulator: Emulator) -> Iterator[None]:
    """Sets the emulator's variables in this process's environment, restoring them after."""
    saved = {k: os.environ.get(k) for k in emulator.env}
    os.environ.update(emulator.env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
