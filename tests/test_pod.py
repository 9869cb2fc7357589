"""`lm pod`: a 2-process x 4-device job on this machine trains exactly like one process with 8
devices, survives SIGKILL of every host and SIGTERM of one host, and finishes its end-of-run
evaluation, sampling and report."""

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
from train_run import lm_command, losses, records, wait_for_step, write_corpus
from train_run import train_args as shared_train_args

STEPS = 16
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "JAX_PLATFORMS": "cpu",
}
# Two processes on a 2-core machine: ~1.5 min per pod run (startup, data caches, compile).
pytestmark = pytest.mark.slow
ONE_PROCESS_ENV = ENV | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("pod") / "corpus.txt")


def train_args(workdir, corpus, *extra):
    return shared_train_args(
        workdir,
        corpus,
        STEPS,
        "--config.data.batch_size=16",
        "--config.data.validation_fraction=0.1",
        "--config.model.dropout=0.1",
        "--config.train.eval_every=8",
        "--config.train.eval_batches=2",
        "--config.train.checkpoint_every=4",
        "--config.train.steps_per_call=1",
        "--config.train.sample_prompts=the |model",
        "--config.train.sample_tokens=8",
        *extra,
    )


def pod(*args):
    return lm_command("pod", "--processes=2", "--devices_per_process=4", "--", *args)


one_process = lm_command


def run(cmd, env=ENV, timeout=300):
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def start(cmd, log):
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def host_pids(log, n=2, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = dict(re.findall(r"\[pod\] host (\d+) pid (\d+)", open(log).read()))
        if len(found) == n:
            return [int(found[str(i)]) for i in range(n)]
        time.sleep(0.05)
    raise TimeoutError("the pod did not start its hosts")


@pytest.fixture(scope="module")
def pod_run(tmp_path_factory, corpus):
    workdir = tmp_path_factory.mktemp("pod_straight") / "run"
    result = run(pod(*train_args(workdir, corpus)))
    return workdir, result


def test_pod_matches_one_process_with_as_many_devices(tmp_path, corpus, pod_run):
    workdir, _ = pod_run
    single = tmp_path / "single"
    run(one_process(*train_args(single, corpus)), env=ONE_PROCESS_ENV)
    expected, got = losses(single), losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert sorted(expected) == sorted(got)
    np.testing.assert_allclose([got[s] for s in expected], list(expected.values()), rtol=1e-5)

    # The rows of the last step, from each host's data state in the final checkpoint: the two
    # hosts' shares are disjoint, 8 rows each, and together the one process's 16.
    def last_rows(workdir, name):
        state = json.loads((workdir / "checkpoints" / "data" / str(STEPS) / name).read_text())
        return {tuple(r) for r in state["last_rows"]}

    host0, host1 = (last_rows(workdir, f"process_{h}-of-2.json") for h in (0, 1))
    assert len(host0) == len(host1) == 8 and not host0 & host1
    assert host0 | host1 == last_rows(single, "process_0-of-1.json")


def test_pod_finishes_evaluation_sampling_and_report(pod_run):
    workdir, result = pod_run
    val = records(workdir, "validation")
    assert sorted(val) == [8, STEPS] and np.isfinite(val[STEPS]["loss"])
    assert (workdir / "report.md").exists()
    # Only host 0 prints the summary, and each prompt got a sample.
    assert result.stdout.count("--- sample ---") == 2
    assert "[host 0] report:" in result.stdout and "[host 1] report:" not in result.stdout
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert steps[-1] == STEPS
    data = sorted(os.listdir(workdir / "checkpoints" / "data" / str(STEPS)))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]


def test_pod_sigkill_every_host_then_resume_is_bit_identical(tmp_path, corpus, pod_run):
    reference = losses(pod_run[0])
    workdir, log = tmp_path / "killed", tmp_path / "pod.log"
    proc = start(pod(*train_args(workdir, corpus)), log)
    pids = host_pids(log)
    wait_for_step(workdir, proc, 6)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=120)
    assert max(losses(workdir)) < STEPS
    result = run(pod(*train_args(workdir, corpus)))
    assert "[host 0]" in result.stderr and "resumed from checkpoint" in result.stderr
    assert losses(workdir) == reference  # every step, bit for bit


def test_sigterm_to_one_host_stops_every_host_at_the_same_step(tmp_path, corpus, pod_run):
    workdir, log = tmp_path / "term", tmp_path / "pod.log"
    proc = start(pod(*train_args(workdir, corpus, "--config.train.checkpoint_every=1000")), log)
    pids = host_pids(log)
    wait_for_step(workdir, proc, 3)
    os.kill(pids[1], signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    text = open(log).read()
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert len(steps) == 1 and 3 <= steps[0] < STEPS, steps
    for host in (0, 1):
        assert f"[host {host}]" in text and re.search(
            rf"\[host {host}\].*saved checkpoint {steps[0]};", text
        ), text[-3000:]
    data = sorted(os.listdir(workdir / "checkpoints" / "data" / str(steps[0])))
    assert data == ["process_0-of-2.json", "process_1-of-2.json"]
    # The resumed pod continues exactly like the uninterrupted one.
    run(pod(*train_args(workdir, corpus, "--config.train.checkpoint_every=1000")))
    assert losses(workdir) == losses(pod_run[0])


def test_pod_mixture_matches_one_process(tmp_path):
    args = [
        "--experiment=mixture_tiny",
        "--config.data.batch_size=16",
        "--config.data.seq_len=32",
        "--config.model.num_layers=1",
        "--config.model.d_model=32",
        "--config.model.d_ff=64",
        "--config.tokenizer.vocab_size=512",
        "--config.train.steps=8",
        "--config.train.log_every=1",
        "--config.train.eval_every=8",
        "--config.train.eval_batches=1",
        "--config.train.steps_per_call=1",
        "--config.train.sample_prompts=",
    ]
    single, multi = tmp_path / "single", tmp_path / "pod"
    run(one_process("train", f"--workdir={single}", *args), env=ONE_PROCESS_ENV, timeout=600)
    run(pod("train", f"--workdir={multi}", *args), timeout=600)
    expected, got = losses(single), losses(multi)
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in expected], list(expected.values()), rtol=1e-5)
