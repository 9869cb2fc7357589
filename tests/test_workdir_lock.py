"""One run per workdir: a second `lm train` on a workdir in use stops at once with one line
naming the owner; a lock left by a killed run (SIGKILL) is taken over with a warning; the lock
is released on success, on an exception and on preemption; a gs:// workdir is locked the same
way, with a heartbeat telling a live owner on another host from a dead one."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from train_run import lm_command, train_args, write_corpus

from lm.training import lock as workdir_lock
from lm.training.guards import Preempted
from lm.training.lock import WorkdirLock, WorkdirLocked

ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"TF_CPP_MIN_LOG_LEVEL": "3"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLDER = textwrap.dedent(
    """
    import sys, time
    from lm.training.lock import WorkdirLock
    WorkdirLock(sys.argv[1], "lm train --experiment=holder").acquire()
    print("held", flush=True)
    time.sleep(600)
    """
)


def wait_for(predicate, proc, timeout=240.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, "the process exited early"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def holder(workdir) -> subprocess.Popen:
    """Another process holding the workdir's lock (until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir)],
        env=ENV | {"PYTHONPATH": REPO},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_held_by_another_process_names_it_and_is_taken_over_once_it_dies(tmp_path, caplog):
    workdir = tmp_path / "run"
    proc = holder(workdir)
    try:
        with pytest.raises(WorkdirLocked) as e:
            with workdir_lock.hold(str(workdir)):
                pass
        message = str(e.value)
        assert "\n" not in message and "in use by another run" in message
        assert f"pid {proc.pid} on {socket.gethostname()}" in message
        assert "`lm train --experiment=holder`" in message and "since 20" in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with caplog.at_level(logging.WARNING), workdir_lock.hold(str(workdir)):
        owner = json.loads((workdir / "lock.json").read_text())
        assert owner["pid"] == os.getpid()
    assert "took over the lock" in caplog.text and f"pid {proc.pid}" in caplog.text
    assert not (workdir / "lock.json").exists()


def test_the_lock_is_released_on_exceptions_and_preemption(tmp_path):
    workdir = tmp_path / "run"
    for exc in (RuntimeError("boom"), Preempted(signal.SIGTERM)):
        with pytest.raises(type(exc)), workdir_lock.hold(str(workdir)):
            assert (workdir / "lock.json").exists()
            with workdir_lock.hold(str(workdir)):  # re-entrant (finetune --method=lm)
                pass
            assert (workdir / "lock.json").exists()
            raise exc
        assert not (workdir / "lock.json").exists()
    assert not workdir.exists()  # it created the directory and nothing was written


def test_the_heartbeat_is_refreshed(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
    lock = WorkdirLock(str(tmp_path))
    lock.acquire()
    try:
        first = json.loads((tmp_path / "lock.json").read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads((tmp_path / "lock.json").read_text())["heartbeat"] > first
    finally:
        lock.release()


def _owner(**kw) -> bytes:
    base = {"host": "other-host", "pid": 4242, "command": "lm train --experiment=tiny"}
    return json.dumps(base | {"since": "2025-01-01 10:00:00 UTC"} | kw).encode()


def test_a_gcs_workdir_is_locked_and_a_stale_lock_taken_over(gcs, caplog):
    fs = gcs.fs()
    workdir = gcs.fresh("locked")
    bare = workdir.removeprefix("gs://") + "/lock.json"
    first = WorkdirLock(workdir, "lm train --experiment=first")
    first.acquire()
    with pytest.raises(WorkdirLocked, match=f"pid {os.getpid()} on .*lm train --experiment=first"):
        WorkdirLock(workdir).acquire()  # this process is alive: held
    first.release()
    assert not fs.exists(bare)

    fs.pipe_file(bare, _owner(heartbeat=time.time()))  # another host, beating
    with pytest.raises(WorkdirLocked, match="pid 4242 on other-host"):
        WorkdirLock(workdir).acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    here = socket.gethostname()
    # Stale: another host silent for 10 minutes; a dead process of this host.
    for stale in (_owner(heartbeat=time.time() - 600),
                  _owner(host=here, pid=int(dead), heartbeat=time.time())):  # fmt: skip
        fs.pipe_file(bare, stale)
        lock = WorkdirLock(workdir)
        with caplog.at_level(logging.WARNING):
            lock.acquire()
        assert json.loads(fs.cat_file(bare))["token"] == lock.owner["token"]
        lock.release()
    assert caplog.text.count("took over the lock") == 2
    assert "no heartbeat for 10 min" in caplog.text and "no longer running" in caplog.text


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("lock") / "corpus.txt")


def test_two_lm_train_runs_on_one_workdir(tmp_path, corpus):
    """The second stops at once with one line naming the first, which then finishes."""
    workdir = tmp_path / "run"
    run = lm_command(*train_args(workdir, corpus, 8, "--config.train.checkpoint_every=4"))
    first = subprocess.Popen(run, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: (workdir / "config.json").exists(), first)  # it packed the data
    first.send_signal(signal.SIGSTOP)  # paused mid-run, the workdir its own
    try:
        start = time.time()
        second = subprocess.run(run, env=ENV, capture_output=True, text=True, timeout=300)
        took = time.time() - start
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-2000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr[-2000:]
    assert lines[0].startswith(f"error: {workdir} is in use by another run: pid {first.pid} on ")
    assert "lm train --experiment=char_tiny" in lines[0] and "since 20" in lines[0]
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err.decode()[-2000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8", "data"]
    assert not (workdir / "lock.json").exists()
    assert took < 120  # it did nothing but start up (no packing, no compiling)


@pytest.mark.slow  # ~15 s idle; the holder test above covers a takeover in make test
def test_a_sigkilled_lm_train_runs_lock_is_taken_over(tmp_path, corpus):
    workdir = tmp_path / "run"
    run = lm_command(*train_args(workdir, corpus, 4, "--config.train.checkpoint_every=4"))
    killed = subprocess.Popen(run, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (workdir / "lock.json").exists(), killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert json.loads((workdir / "lock.json").read_text())["pid"] == killed.pid
    result = subprocess.run(run, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "took over the lock" in result.stderr and f"pid {killed.pid}" in result.stderr
    assert "no longer running" in result.stderr
    assert not (workdir / "lock.json").exists()
