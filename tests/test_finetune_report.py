"""`lm finetune` end to end on a JSONL file where good conversations are mixed with hostile
lines: the run finishes, every bad line is a counted reject with its reason in finetune.json,
and the workdir explains itself (report.md: config, data counts with rejects, loss curve,
validation before / after, greedy replies to held-out prompts before and after), while the
printed summary shows metrics as before -> after and counts as counts.

Expected values come from what the test wrote (the bad lines and their reasons, the good
conversations) and from plain forward passes (the greedy replies), not from the code under
test."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from lm.cli import main
from lm.finetune import make_data
from tests.test_finetune import greedy_by_hand
from tests.test_finetune_hostile import CONVERSATION_BAD

GOOD = 48
SAMPLE_TOKENS = 12


@pytest.fixture(scope="module")
def run(tiny_workdir, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_report")
    good = make_data.instructions(GOOD, seed=0)
    lines = [json.dumps({"messages": m}).encode() for m in good]
    for i, (bad, _) in enumerate(CONVERSATION_BAD):  # a bad line after every few good ones
        line = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
        lines.insert(min(len(lines), 1 + 2 * i), line)
    data = root / "mixed.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    workdir = str(root / "sft")
    argv = [
        "finetune", "--experiment=sft_tiny", f"--init={tiny_workdir}", f"--workdir={workdir}",
        f"--config.finetune.data={data}", "--config.finetune.eval_fraction=0.25",
        "--config.data.batch_size=8", "--config.train.steps=3", "--config.train.log_every=1",
        "--config.train.steps_per_call=1", f"--config.train.sample_tokens={SAMPLE_TOKENS}",
    ]  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    with open(os.path.join(workdir, "finetune.json")) as f:
        record = json.load(f)
    with open(os.path.join(workdir, "report.md")) as f:
        report = f.read()
    return SimpleNamespace(
        workdir=workdir, init=tiny_workdir, good=good, out=out.getvalue(), record=record,
        report=report,
    )  # fmt: skip


def test_every_hostile_line_is_a_counted_reject_with_its_reason(run):
    data = run.record["data"]
    assert sum(data["rejected"].values()) == len(CONVERSATION_BAD)
    assert data["rejected"] == Counter(reason for _, reason in CONVERSATION_BAD)
    assert data["train_examples"] + data["held_out_examples"] == GOOD


def test_report_holds_config_data_curve_validation_and_samples(run):
    report, record = run.report, run.record
    assert "| method | sft |" in report and f"| init | `{run.init}` |" in report
    assert f"| rejected records | {len(CONVERSATION_BAD)} |" in report
    for reason, count in Counter(r for _, r in CONVERSATION_BAD).items():
        assert f"| &nbsp;&nbsp;rejected: {reason} | {count} |" in report
    with open(os.path.join(run.workdir, "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "![loss curve](loss_curve.png)" in report
    before, after = record["validation_before"]["loss"], record["validation"]["loss"]
    assert f"| loss | {before:.4f} | {after:.4f} |" in report
    assert "| weight |" not in report  # a count, shown as one
    samples = record["samples"]
    assert len(samples) == 3
    for sample in samples:
        assert sample["prompt"] in [conversation[:-1] for conversation in run.good]
        assert sample["before"] in report and sample["after"] in report
    assert "## Config" in report and "sample_tokens: 12" in report


def test_sample_replies_are_greedy_replies_of_the_init_and_the_result(run):
    """The report's replies are the greedy continuations of the chat prompt, from the init's
    weights (before) and from the saved checkpoint (after), decoded by full forward passes."""
    from lm.tokenizer.chat import apply_chat_template, chat_stop_token_ids
    from lm.training.restore import restore_run

    sample = run.record["samples"][0]
    for key, workdir in (("before", run.init), ("after", run.workdir)):
        restored = restore_run(workdir)
        vocab = restored.vocab
        prompt = apply_chat_template(vocab, sample["prompt"], add_generation_prompt=True)
        stop = {vocab.eos_id, *chat_stop_token_ids(vocab)}
        ids = greedy_by_hand(
            restored.trainer.graphdef, restored.params, prompt, SAMPLE_TOKENS, stop
        )
        assert sample[key] == vocab.decode(ids), key
    assert np.isfinite(run.record["validation"]["loss"])


def test_summary_prints_metrics_before_and_after_and_counts_as_counts(run):
    lines = run.out.splitlines()
    before, after = run.record["validation_before"]["loss"], run.record["validation"]["loss"]
    loss = next(line for line in lines if line.startswith("validation loss"))
    assert loss.split()[-3:] == [f"{before:.4f}", "->", f"{after:.4f}"]
    tokens = next(line for line in lines if line.startswith("validation tokens"))
    assert tokens.split()[-1] == f"{int(run.record['validation']['weight']):,}"
    rejected = next(line for line in lines if line.startswith("rejected records"))
    assert rejected.split()[2] == str(len(CONVERSATION_BAD))
    assert not any("before" in line and "after" in line for line in lines)
    assert f"report: {os.path.join(run.workdir, 'report.md')}" in lines
