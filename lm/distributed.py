"""Joining a multi-process JAX job, before anything touches the XLA backend.

Every `lm` command that runs on a pod calls `initialize()` first. The job is described by
environment variables (set by `lm pod` on one machine, or by a cluster launcher), or by the
flags `lm --coordinator=H:P --num_processes=N --process_id=I <command>`:

  LM_COORDINATOR     host:port of process 0's coordination service
  LM_NUM_PROCESSES   how many processes take part
  LM_PROCESS_ID      this process's index, 0 .. LM_NUM_PROCESSES-1

CPU processes talk through gloo collectives. On TPU VM slices (`gcp/launch.sh` sets
LM_MULTIHOST=1) `jax.distributed.initialize()` auto-detects the slice. Calling anything that
starts the backend first (`jax.devices()`, `jax.process_count()`) would freeze a one-process
backend, so this module reads only the environment until `initialize` has run.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from lm.errors import ConfigError

COORDINATOR = "LM_COORDINATOR"
NUM_PROCESSES = "LM_NUM_PROCESSES"
PROCESS_ID = "LM_PROCESS_ID"
MULTIHOST = "LM_MULTIHOST"

_joined = False
# `lm --coordinator=H:P --num_processes=N --process_id=I <command>` sets the same variables.
JOB_FLAGS = {
    "--coordinator": COORDINATOR,
    "--num_processes": NUM_PROCESSES,
    "--process_id": PROCESS_ID,
}


def take_job_flags(argv: list[str], env=None) -> list[str]:
    """Moves the job flags of `argv` (before any `--`) into `env` (os.environ); returns the
    rest. For GPU clusters whose launcher passes the job on the command line."""
    env = os.environ if env is None else env
    rest = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return rest + argv[i:]
        name, _, value = arg.partition("=")
        if name in JOB_FLAGS:
            if not value:
                raise ConfigError(f"{name} needs a value: {name}=...")
            env[JOB_FLAGS[name]] = value
        else:
            rest.append(arg)
    return rest


def job_from_env(env=None) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from the environment, or None."""
    env = os.environ if env is None else env
    coordinator = env.get(COORDINATOR)
    if not coordinator:
        return None
    try:
        num, pid = int(env[NUM_PROCESSES]), int(env[PROCESS_ID])
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f"{COORDINATOR} is set, so {NUM_PROCESSES} and {PROCESS_ID} (or --num_processes "
            "and --process_id) must be integers"
        ) from e
    if not 0 <= pid < num:
        raise ConfigError(f"{PROCESS_ID}={pid} must be in [0, {NUM_PROCESSES}={num})")
    return coordinator, num, pid


def initialize() -> None:
    """Joins the job the environment describes (no-op for a single process, or when joined)."""
    global _joined
    if _joined or jax.distributed.is_initialized():
        _joined = True
        return
    job = job_from_env()
    if job is not None and job[1] > 1:
        coordinator, num, pid = job
        # CPU processes need a collectives backend; it must be chosen before initialize.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        local = os.environ.get("LM_LOCAL_DEVICE_IDS")  # GPU clusters: this process's devices
        local_ids = [int(i) for i in local.split(",")] if local else None
        jax.distributed.initialize(coordinator, num, pid, local_device_ids=local_ids)
        logging.info("joined %s as process %d of %d", coordinator, pid, num)
    elif os.environ.get(MULTIHOST) == "1":
        jax.distributed.initialize()  # TPU VM slice: everything is auto-detected
    _joined = True


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on at least one (a collective on pods: every
    process must call it at the same point). Free on a single process."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray([int(flag)], np.int32))
    return bool(np.max(flags))


def barrier(name: str, timeout_s: float = 24 * 3600) -> None:
    """Waits until every process reaches the barrier `name` (no-op on one process).

    Why the coordination service's barrier and not a device collective
    (`sync_global_devices`): the other hosts may wait here for as long as host 0 packs a corpus
    (hours on a real one), and a CPU collective gives up after 30 s.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    if client is None:  # joined by other means than jax.distributed: a device collective
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, int(timeout_s * 1000))
