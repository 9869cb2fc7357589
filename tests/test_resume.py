"""Checkpoints: SIGKILL + restart reproduces the uninterrupted losses bit for bit; SIGTERM saves
and exits; a corrupt checkpoint is skipped with a warning and never loaded; train.profile_steps
writes a profiler trace."""

import os
import re
import signal
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from train_run import lm_command, losses, train_args, wait_for_step, write_corpus

from lm.training.checkpoint import Checkpointer

STEPS = 24
# One CPU device: `make test` sets 8 fake devices, which batch 12 does not divide.
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("resume") / "corpus.txt")


def command(workdir, corpus, *extra):
    return lm_command(*train_args(workdir, corpus, STEPS, "--config.model.dropout=0.1",
                      "--config.train.eval_every=12", "--config.train.checkpoint_every=4",
                      *extra))  # fmt: skip


# Both run in `make test-slow` (~50 s each); in make test, kill/resume is covered by
# test_gcs_train (a bucket) and test_finetune (a fine-tuning run resumed).
@pytest.mark.parametrize(
    "per_call", [pytest.param(1, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)]
)
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, corpus, per_call):
    env = ENV
    # per_call=4: steps run in groups of 4 per jitted call, logged after each group.
    grouping = [f"--config.train.steps_per_call={per_call}", f"--config.train.log_every={per_call}"]
    straight = tmp_path / "straight"
    subprocess.run(command(straight, corpus, *grouping), check=True, env=env, capture_output=True)
    reference = losses(straight)
    assert sorted(reference) == list(range(per_call, STEPS + 1, per_call))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        command(killed, corpus, *grouping),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_step(killed, proc, 10)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = losses(killed)
    assert max(partial) < STEPS
    result = subprocess.run(
        command(killed, corpus, *grouping), env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from checkpoint" in result.stderr
    resumed = losses(killed)
    assert resumed == reference  # every step, bit for bit


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, corpus):
    env = ENV
    workdir = tmp_path / "term"
    proc = subprocess.Popen(
        command(workdir, corpus, "--config.train.checkpoint_every=1000"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_step(workdir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert len(steps) == 1 and 3 <= steps[0] < STEPS
    assert f"saved checkpoint {steps[0]}" in err
    assert not (workdir / "lock.json").exists()  # released on preemption


def test_corrupt_checkpoint_is_skipped(tmp_path, caplog):
    state = {"w": jnp.arange(4.0), "step": jnp.int32(0)}
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=5, every=1, async_save=False)
    ckpt.save(1, {"w": jnp.arange(4.0), "step": jnp.int32(1)}, {"batches": 1})
    ckpt.save(2, {"w": jnp.arange(4.0) * 2, "step": jnp.int32(2)}, {"batches": 2})
    ckpt.wait()
    for root, _, files in os.walk(tmp_path / "ckpt" / "2" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")
    restored, data, step = ckpt.restore_latest(state)
    ckpt.close()
    assert step == 1 and data == {"batches": 1}
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    assert "checkpoint 2" in caplog.text and "unreadable" in caplog.text


@pytest.mark.slow  # 25 s; `make test-slow`
def test_profile_steps_write_a_trace(tmp_path, corpus):
    workdir = tmp_path / "profiled"
    run = command(workdir, corpus, "--config.train.steps=6", "--config.train.profile_steps=2")
    result = subprocess.run(run, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert "profiler trace up to step 3" in result.stderr


@pytest.mark.slow  # ~40 s; test_sigterm_saves_a_checkpoint_and_exits stays in make test
def test_sigterm_during_a_checkpoint_call_saves_once(tmp_path, corpus):
    """A signal that arrives during a call ending on a checkpoint step: one save, exit 143."""
    workdir = tmp_path / "term_ckpt"
    run = command(workdir, corpus, "--config.train.checkpoint_every=1")
    proc = subprocess.Popen(
        run, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    wait_for_step(workdir, proc, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    assert err.count("saved checkpoint") == 1
    last = int(re.search(r"saved checkpoint (\d+)", err).group(1))
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps[-1] == last
    result = subprocess.run(run, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from checkpoint {last}" in result.stderr


@pytest.mark.slow  # ~40 s: make test-slow (make test near 20 min)
def test_checkpoint_of_another_model_is_a_one_line_error(tmp_path, corpus):
    workdir = tmp_path / "mismatch"
    short = ["--config.train.steps=4"]
    subprocess.run(command(workdir, corpus, *short), check=True, env=ENV, capture_output=True)
    before = sorted(os.listdir(workdir / "checkpoints"))
    metrics = (workdir / "metrics.jsonl").read_text()
    result = subprocess.run(
        command(workdir, corpus, "--config.train.steps=8", "--config.model.d_model=48"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    assert last.startswith("error: checkpoint 4"), last
    assert re.search(r"params\.\S+[a-z] has shape \(.*8.*\) in the checkpoint but \(.*12.*\)", last)
    assert sorted(os.listdir(workdir / "checkpoints")) == before  # nothing deleted
    assert (workdir / "metrics.jsonl").read_text() == metrics  # nothing truncated


@pytest.mark.slow  # ~50 s: make test-slow
def test_corrupt_newest_checkpoint_resumes_from_the_previous(tmp_path, corpus):
    # A constant lr without warmup: a 12-step run trains exactly like the first 12 steps of
    # a 24-step one (a decaying schedule depends on train.steps).
    flat = ["--config.optim.schedule=constant", "--config.optim.warmup_steps=0"]
    reference_dir = tmp_path / "reference"
    subprocess.run(command(reference_dir, corpus, *flat), check=True, env=ENV, capture_output=True)
    workdir = tmp_path / "corrupt"
    short = [*flat, "--config.train.steps=12"]
    subprocess.run(command(workdir, corpus, *short), check=True, env=ENV, capture_output=True)
    for root, _, files in os.walk(workdir / "checkpoints" / "12" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")
    result = subprocess.run(
        command(workdir, corpus, *flat), env=ENV, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint 12" in result.stderr and "unreadable" in result.stderr
    assert "resumed from checkpoint 8" in result.stderr
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps[-1] == STEPS
    assert (workdir / "checkpoints" / "12.corrupt").is_dir()
    assert losses(workdir) == losses(reference_dir)


def test_first_mismatch_names_the_parameter_and_both_shapes():
    from lm.training.checkpoint import first_mismatch

    saved = {"params": {"w": np.zeros((2, 3))}, "step": np.int32(0)}
    assert first_mismatch(saved, saved) is None
    want = {"params": {"w": np.zeros((2, 4))}, "step": np.int32(0)}
    assert first_mismatch(saved, want) == (
        "params.w has shape (2, 3) in the checkpoint but (2, 4) in this config"
    )
    assert "params.b" in first_mismatch(saved, {**want, "params": {"b": np.zeros(1)}})


def test_spike_guard_gives_up_after_consecutive_skips():
    from lm.errors import LMError
    from lm.training.guards import SkipGuard

    guard = SkipGuard(3)
    guard.update(np.float32(1), 1)
    guard.update(np.float32(1), 2)
    guard.update(np.float32(0), 3)  # an accepted update resets the count
    guard.update(np.asarray([0, 1, 1], np.float32), 6)
    assert guard.run == 2
    with pytest.raises(LMError, match="3 consecutive updates skipped up to step 7"):
        guard.update(np.float32(1), 7)
    SkipGuard(0).update(np.ones(100), 100)  # 0: never gives up
