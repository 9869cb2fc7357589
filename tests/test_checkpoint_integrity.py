"""Checkpoint integrity: checksums verified on restore (a flipped bit falls back to the previous
checkpoint), a missing data state falls back too, every checkpoint unreadable is one line,
pruned steps leave no data states, a full disk is one line at the save that failed, and a
recovering run prints no orbax/asyncio tracebacks."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from lm.errors import CheckpointError
from lm.training.checkpoint import Checkpointer

ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"TF_CPP_MIN_LOG_LEVEL": "3"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def state(step: int) -> dict:
    """A train-state-like tree: 2,000 floats that differ per step, and the step."""
    return {"w": jnp.arange(2000.0) * step, "b": jnp.ones(7) * step, "step": jnp.int32(step)}


def abstract() -> dict:
    return state(0)


def save_steps(directory, steps, *, keep=5, async_save=True) -> None:
    ckpt = Checkpointer(str(directory), keep=keep, async_save=async_save)
    for step in steps:
        ckpt.save(step, state(step), {"batches": step})
    ckpt.close()


def largest_array_file(step_dir) -> str:
    """The biggest file under the step's `d/` directories: where the array bytes are."""
    found = [
        os.path.join(root, name)
        for root, _, names in os.walk(step_dir)
        for name in names
        if os.path.basename(root) == "d"
    ]
    return max(found, key=os.path.getsize)


def flip_bit(path) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x04
    open(path, "wb").write(bytes(data))


def restore(directory, **kw):
    ckpt = Checkpointer(str(directory), keep=5)
    try:
        return ckpt.restore_latest(abstract(), **kw)
    finally:
        ckpt.close()


@pytest.mark.parametrize("async_save", [True, False])
def test_a_flipped_bit_falls_back_to_the_previous_checkpoint(tmp_path, caplog, async_save):
    save_steps(tmp_path, [1, 2], async_save=async_save)
    flip_bit(largest_array_file(tmp_path / "2"))
    with caplog.at_level(logging.WARNING):
        restored, data, step = restore(tmp_path)
    assert step == 1 and data == {"batches": 1}
    np.testing.assert_array_equal(restored["w"], np.arange(2000.0))  # what step 1 saved
    np.testing.assert_array_equal(restored["b"], np.ones(7))
    assert "checkpoint 2" in caplog.text and "CRC32C" in caplog.text
    assert (tmp_path / "2.corrupt").is_dir() and not (tmp_path / "2").exists()


def test_a_checkpoint_without_checksums_still_restores(tmp_path):
    """Checkpoints written before checksums existed restore, unverified."""
    save_steps(tmp_path, [1, 2])
    os.remove(tmp_path / "2" / "checksums.json")
    restored, data, step = restore(tmp_path)
    assert step == 2 and data == {"batches": 2}
    np.testing.assert_array_equal(restored["w"], np.arange(2000.0) * 2)


def test_every_file_of_the_state_is_recorded(tmp_path):
    save_steps(tmp_path, [3])
    sums = json.loads((tmp_path / "3" / "checksums.json").read_text())
    written = {
        os.path.relpath(os.path.join(root, n), tmp_path / "3")
        for root, _, names in os.walk(tmp_path / "3" / "state")
        for n in names
    }
    assert set(sums["files"]) == written
    assert set(sums["data"]) == {"process_0-of-1.json"}
    for rel, (size, _crc) in sums["files"].items():
        assert size == os.path.getsize(tmp_path / "3" / rel)


def test_a_missing_data_state_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])
    os.remove(tmp_path / "data" / "2" / "process_0-of-1.json")
    with caplog.at_level(logging.WARNING):
        restored, data, step = restore(tmp_path)
    assert step == 1 and data == {"batches": 1}
    assert "process_0-of-1.json is missing" in caplog.text
    assert "process count" not in caplog.text


def test_a_process_count_change_is_a_one_line_error(tmp_path):
    save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        src = tmp_path / "data" / str(step) / "process_0-of-1.json"
        for i in range(2):
            (src.parent / f"process_{i}-of-2.json").write_text(src.read_text())
        src.unlink()
    with pytest.raises(CheckpointError, match="another number of processes") as e:
        restore(tmp_path)
    assert "\n" not in str(e.value) and "process_0-of-2.json" in str(e.value)
    assert (tmp_path / "2").is_dir()  # nothing moved aside


def test_every_checkpoint_unreadable_is_a_one_line_error(tmp_path):
    save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        (tmp_path / str(step) / "state" / "manifest.ocdbt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError) as e:
        restore(tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert "every checkpoint" in message and "unreadable" in message
    assert "starts from step 0" in message
    assert (tmp_path / "1.corrupt").is_dir() and (tmp_path / "2.corrupt").is_dir()
    assert restore(tmp_path) is None  # the re-run starts afresh, as the message says


@pytest.mark.parametrize("async_save", [True, False])
def test_pruned_checkpoints_leave_no_data_states(tmp_path, async_save):
    save_steps(tmp_path, [1, 2, 3, 4, 5], keep=2, async_save=async_save)
    assert sorted(os.listdir(tmp_path / "data")) == ["4", "5"]
    assert sorted(n for n in os.listdir(tmp_path) if n != "data") == ["4", "5"]


RECOVER = textwrap.dedent(
    """
    import os, sys
    import jax.numpy as jnp
    from lm.cli import quiet_logs
    from lm.training.checkpoint import Checkpointer
    quiet_logs()
    root = sys.argv[1]
    tree = lambda s: {f"w{i}": jnp.arange(500.0) * s + i for i in range(40)}
    ckpt = Checkpointer(root, keep=5)
    for s in (1, 2, 3, 4):
        ckpt.save(s, tree(s), {"batches": s})
    ckpt.close()
    def largest(step):  # the biggest array data file (under a `d` directory)
        found = [os.path.join(r, n) for r, _, ns in os.walk(f"{root}/{step}/state")
                 for n in ns if os.path.basename(r) == "d"]
        return max(found, key=os.path.getsize)
    # 4 and 3 as written before checksums existed: 4 lost its largest data file, 3 has a
    # garbled manifest; 2 has a flipped bit (caught by its checksums).
    for step in (3, 4):
        if os.path.exists(f"{root}/{step}/checksums.json"):
            os.remove(f"{root}/{step}/checksums.json")
    os.remove(largest(4))
    with open(f"{root}/3/state/manifest.ocdbt", "wb") as f:
        f.write(b"\\x00garbage")
    data = bytearray(open(largest(2), "rb").read())
    data[len(data) // 2] ^= 1
    open(largest(2), "wb").write(bytes(data))
    ckpt = Checkpointer(root, keep=5)
    restored, _, step = ckpt.restore_latest(tree(0))
    ckpt.close()
    import time, gc
    time.sleep(1.0); gc.collect()  # late tensorstore callbacks land here
    print("restored", step, float(restored["w1"][1]))
    """
)


def test_a_recovering_restore_prints_no_tracebacks(tmp_path):
    """Orbax abandons a failed restore's other reads; their callbacks used to print 111-196
    'Event loop is closed' tracebacks."""
    result = subprocess.run(
        [sys.executable, "-c", RECOVER, str(tmp_path / "ckpt")],
        env=ENV | {"PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Event loop is closed" not in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "never retrieved" not in result.stderr and "Exception ignored" not in result.stderr
    assert result.returncode == 0
    assert result.stdout.split() == ["restored", "1", "2.0"]  # w1 = arange * 1 + 1, at index 1
    skipped = [ln for ln in result.stderr.splitlines() if "is unreadable" in ln]
    assert len(skipped) == 3, result.stderr[-3000:]  # one line per skipped checkpoint


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs (the test fills it); skipped where mounting one is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root: the full-disk test cannot run here")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): no full-disk test")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk, leave: int) -> None:
    """Writes a filler file so that `leave` bytes stay free."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


FULL_DURING_WRITE = textwrap.dedent(
    """
    import sys
    import jax
    from lm.cli import quiet_logs
    from lm.errors import CheckpointError
    from lm.training.checkpoint import Checkpointer
    quiet_logs()
    # 400 KB of incompressible arrays on a disk with 300 KB free: the asynchronous write fails.
    tree = {f"w{i}": jax.random.normal(jax.random.key(i), (10000,)) for i in range(10)}
    ckpt = Checkpointer(sys.argv[1], keep=2)
    ckpt.save(1, tree, {"batches": 1})
    try:
        ckpt.wait()
    except CheckpointError as e:
        print(f"error: {e}")
    ckpt.close()
    """
)


def test_a_disk_full_during_an_asynchronous_save_is_one_line(small_disk):
    (small_disk / "ckpt").mkdir()
    fill(small_disk, 300_000)
    result = subprocess.run(
        [sys.executable, "-c", FULL_DURING_WRITE, str(small_disk / "ckpt")],
        env=ENV | {"PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines() == [
        f"error: checkpoint 1 could not be saved in {small_disk / 'ckpt'} (no space left on "
        "device); free space (or fix the storage) and re-run"
    ]
    assert result.stderr.strip() == "", result.stderr[-3000:]  # no orbax/asyncio tracebacks
    assert os.listdir(small_disk / "ckpt") in (["data"], [])  # no partial step left behind
    assert os.listdir(small_disk / "ckpt" / "data") == []


@pytest.mark.slow  # three short runs (~30 s idle); the asynchronous case above is in make test
def test_lm_train_on_a_full_disk_stops_at_that_save_with_one_line(small_disk):
    from train_run import lm_command, records, train_args, write_corpus

    corpus = write_corpus(small_disk.parent / "corpus.txt")
    workdir = small_disk / "run"

    def train(steps: int) -> subprocess.CompletedProcess:
        args = train_args(workdir, corpus, steps, "--config.train.checkpoint_every=4")
        return subprocess.run(lm_command(*args), env=ENV, capture_output=True, text=True)

    assert train(8).returncode == 0
    fill(small_disk, 60_000)  # less than one checkpoint
    result = train(20)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint 12 could not be saved in {workdir}/checkpoints")
    assert "no space left on device" in last and "resume from checkpoint 8" in last
    assert max(records(workdir)) == 12  # it stopped at the save that failed
    assert sorted(n for n in os.listdir(workdir / "checkpoints") if n != "data") == ["4", "8"]
    os.remove(small_disk / "filler")
    resumed = train(12)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint 8" in resumed.stderr  # nothing saved before was lost


def test_a_changed_object_in_a_bucket_falls_back_to_the_previous_checkpoint(gcs, caplog):
    """In a bucket the CRC32C comes from the objects' metadata (nothing is downloaded)."""
    fs = gcs.fs()
    root = gcs.fresh("ckpt")
    save_steps(root, [1, 2])
    bare = root.removeprefix("gs://")
    sums = json.loads(fs.cat_file(f"{bare}/2/checksums.json"))
    rel = max((r for r in sums["files"] if "/d/" in r), key=lambda r: sums["files"][r][0])
    data = bytearray(fs.cat_file(f"{bare}/2/{rel}"))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(f"{bare}/2/{rel}", bytes(data))
    with caplog.at_level(logging.WARNING):
        restored, data_state, step = restore(root)
    assert step == 1 and data_state == {"batches": 1}
    np.testing.assert_array_equal(restored["w"], np.arange(2000.0))
    assert f"{rel} does not match its CRC32C" in caplog.text


def test_lm_train_resumes_from_the_previous_checkpoint_after_a_flipped_bit(tmp_path):
    """`lm train` end to end: the resumed run logs exactly the losses the first run logged
    after checkpoint 4, so it restored checkpoint 4's weights (not the altered ones)."""
    from train_run import lm_command, losses, train_args, write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt")
    workdir = tmp_path / "run"
    run = lm_command(*train_args(workdir, corpus, 8, "--config.train.checkpoint_every=4"))
    subprocess.run(run, env=ENV, check=True, capture_output=True)
    first = losses(workdir)
    flip_bit(largest_array_file(workdir / "checkpoints" / "8"))
    result = subprocess.run(run, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint 8" in result.stderr and "does not match its CRC32C" in result.stderr
    assert "resumed from checkpoint 4" in result.stderr
    assert "Traceback" not in result.stderr
    assert losses(workdir) == first
    assert (workdir / "checkpoints" / "8.corrupt").is_dir()
