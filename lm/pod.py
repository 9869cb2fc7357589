"""`lm pod --processes=N --devices_per_process=D -- <lm command>`: a multi-process job on one
machine, for testing pod behaviour (sharding across processes, per-host data, preemption) on CPU.

Starts N copies of `python -m lm.cli <command>`, each with D fake CPU devices and the
LM_COORDINATOR / LM_NUM_PROCESSES / LM_PROCESS_ID variables `lm.distributed` joins with. Their
output is relayed line by line with a `[host i]` prefix; SIGTERM and SIGINT are forwarded to every
process; the exit status is the first non-zero one of a process (0 when all succeed). When one
process fails, the others get `grace_s` seconds to finish (they usually fail at their next
collective) before they are killed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from lm.distributed import COORDINATOR, NUM_PROCESSES, PROCESS_ID
from lm.errors import ConfigError

DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict, index: int, processes: int, devices: int, port: int) -> dict:
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_FLAG}={devices}"])
    env.setdefault("JAX_PLATFORMS", "cpu")
    env[COORDINATOR] = f"127.0.0.1:{port}"
    env[NUM_PROCESSES] = str(processes)
    env[PROCESS_ID] = str(index)
    env.pop("LM_MULTIHOST", None)
    return env


def _relay(stream, out, prefix: str, lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            out.flush()
    stream.close()


def _status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal s: 128 + s, as a shell reports


def run_pod(
    command: list[str], processes: int, devices_per_process: int, *, grace_s: float = 60.0
) -> int:
    if processes < 1 or devices_per_process < 1:
        raise ConfigError("--processes and --devices_per_process must be >= 1")
    if not command:
        raise ConfigError("missing command: put the lm command after --, e.g. -- train ...")
    port = free_port()
    lock = threading.Lock()
    children: list[subprocess.Popen] = []
    threads = []
    for i in range(processes):
        proc = subprocess.Popen(
            [sys.executable, "-m", "lm.cli", *command],
            env=child_env(os.environ, i, processes, devices_per_process, port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,  # signals reach the hosts only through this process
        )
        children.append(proc)
        print(f"[pod] host {i} pid {proc.pid}", file=sys.stderr, flush=True)
        for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
            t = threading.Thread(target=_relay, args=(stream, out, f"[host {i}] ", lock))
            t.daemon = True
            t.start()
            threads.append(t)

    def forward(signum, _frame):
        for proc in children:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    first_failure: int | None = None
    failed_at = None
    try:
        running = set(range(processes))
        while running:
            for i in sorted(running):
                code = children[i].poll()
                if code is None:
                    continue
                running.discard(i)
                if code and first_failure is None:
                    first_failure, failed_at = _status(code), time.monotonic()
            if running and failed_at is not None and time.monotonic() - failed_at > grace_s:
                for i in running:
                    children[i].kill()
            time.sleep(0.05)
    finally:
        for proc in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for t in threads:
            t.join(timeout=5)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return first_failure or 0
