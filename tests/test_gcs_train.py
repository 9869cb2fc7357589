"""`lm train --workdir=gs://...` end to end against the GCS emulator: trained, SIGKILLed after
its first checkpoint, resumed, then sampled from another directory; every file of the run is in
the bucket and no local `gs:` directory appears anywhere."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from train_run import lm_command, train_args, write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def _env(gcs) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    return env | gcs.env | {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}


def _train(workdir: str, corpus: str) -> list[str]:
    extra = ["--config.train.eval_every=6", "--config.train.checkpoint_every=4"]
    return lm_command(*train_args(workdir, corpus, STEPS, *extra))


def _gs_dirs(root: str) -> list[str]:
    """Every file or directory named like `gs:` under `root` (a gs:// path used as local)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".git", ".venv", "__pycache__")]
        found += [os.path.join(dirpath, n) for n in dirnames + filenames if n.startswith("gs:")]
    return found


def _steps_logged(fs, bare: str) -> list[int]:
    try:
        text = fs.cat(f"{bare}/metrics.jsonl").decode()
    except FileNotFoundError:
        return []
    return [json.loads(ln)["step"] for ln in text.splitlines() if ln.strip()]


def test_train_kill_resume_sample_on_gcs(gcs, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 300)
    workdir = gcs.fresh("run")
    bare = workdir.removeprefix("gs://")
    fs = gcs.fs()
    env = _env(gcs)
    train_cwd, sample_cwd = tmp_path / "train_cwd", tmp_path / "sample_cwd"
    train_cwd.mkdir()
    sample_cwd.mkdir()

    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(
        _train(workdir, str(corpus)), cwd=train_cwd, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 300
    # Killed once checkpoint 4 is committed (orbax's marker on object stores, written last).
    while not fs.exists(f"{bare}/checkpoints/4/commit_success.txt"):
        if proc.poll() is not None or time.time() > deadline:
            log.close()
            pytest.fail(
                "training ended or stalled before checkpoint 4:\n"
                + (tmp_path / "first.log").read_text()[-3000:]
            )
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()

    resumed = subprocess.run(
        _train(workdir, str(corpus)),
        cwd=train_cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if resumed.returncode != 0:
        print("bucket after the failed resume:", *sorted(fs.find(bare)), sep="\n")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint" in resumed.stderr
    steps = [s for s in _steps_logged(fs, bare)]
    assert max(steps) == STEPS

    sample = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm.cli",
            "sample",
            f"--workdir={workdir}",
            "--prompt=the ",
            "--max_new_tokens=8",
        ],
        cwd=sample_cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert sample.stdout.strip()

    assert _gs_dirs(str(train_cwd)) == [] and _gs_dirs(str(sample_cwd)) == []
    assert _gs_dirs(REPO) == []
    files = sorted(f.removeprefix(bare + "/") for f in fs.find(bare))
    print("\n".join(files))
    for expected in ("config.json", "metrics.jsonl", "report.md", "tokenizer/spm.model"):
        assert expected in files, (expected, files)
    assert any(f.startswith("tb/train/events.out.tfevents") for f in files)
    assert any(f.startswith("checkpoints/12/") for f in files)
    assert any(f.startswith("checkpoints/4/") or f.startswith("checkpoints/8/") for f in files)
