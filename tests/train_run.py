"""Shared by the tests that run `lm train` as a real process (resume, pod, bucket): a small
corpus, the command of a 1-layer char_tiny run, its logged metrics, and waiting for a step."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

WORDS = ["the", "model", "loss", "falls", "when", "data", "is", "packed", "and", "shuffled"]


def write_corpus(path, paragraphs: int = 400) -> str:
    """`paragraphs` paragraphs of 40 random words (seeded), blank-line separated."""
    rng = np.random.default_rng(0)
    text = "\n\n".join(" ".join(rng.choice(WORDS, 40)) + "." for _ in range(paragraphs))
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def train_args(workdir, corpus, steps: int, *extra: str) -> list[str]:
    """`lm train` arguments of a 1-layer, 32-wide char_tiny run logging every step."""
    return [
        "train",
        "--experiment=char_tiny",
        f"--workdir={workdir}",
        f"--config.data.path={corpus}",
        "--config.model.num_layers=1",
        "--config.model.d_model=32",
        "--config.model.d_ff=64",
        f"--config.train.steps={steps}",
        "--config.train.log_every=1",
        "--config.train.sample_prompts=",
        *extra,
    ]


def lm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lm.cli", *args]


def records(workdir, split: str = "train") -> dict[int, dict]:
    """metrics.jsonl records of `split` by step; a step logged twice fails the test."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["split"] == split:
                assert record["step"] not in out, "a step was logged twice"
                out[record["step"]] = record
    return out


def losses(workdir) -> dict[int, float]:
    return {step: r["loss"] for step, r in records(workdir).items()}


def wait_for_step(workdir, proc, step: int, timeout: float = 240) -> None:
    """Returns once metrics.jsonl logs `step`; fails if `proc` exits first."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and any(
            json.loads(ln).get("step", 0) >= step for ln in open(path) if ln.strip()
        ):
            return
        assert proc.poll() is None, "the run exited before it was interrupted"
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")
