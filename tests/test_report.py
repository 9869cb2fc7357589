"""Tests for lm/training/report.py: report.md from a synthetic metrics.jsonl."""

from __future__ import annotations

import json
import math
import os

import pytest

from lm.config import default_config
from lm.training import report as R


def _write_jsonl(workdir, records) -> None:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _synthetic(with_eval: bool) -> list[dict]:
    recs = []
    for step in range(10, 101, 10):
        recs.append(
            {
                "step": step,
                "split": "train",
                "loss": 8.0 * math.exp(-step / 30) + 1.0,
                "tokens_per_s": 1000.0 + step,  # median of 1010..1100 = 1055
                "mfu": 0.2,
                "time": 1000.0 + step,  # wall = 90 s
            }
        )
        if with_eval and step % 50 == 0:
            recs.append({"step": step, "split": "eval", "loss": 2.0 if step == 50 else 2.5})
    return recs


def test_report_with_validation(tmp_path):
    workdir = str(tmp_path)
    recs = _synthetic(with_eval=True)
    recs[-1]["bytes_per_token"] = 4.0  # eval line at step 100
    _write_jsonl(workdir, recs)
    cfg = default_config()
    cfg.description = "A tiny synthetic test run."
    path = R.write_report(
        workdir,
        cfg,
        samples=[("def ", "foo():\n    return 1"), ("x = ```", "y")],
        extra={"parameters": 1234},
    )
    assert path == os.path.join(workdir, "report.md")
    text = open(path).read()
    png = tmp_path / "loss_curve.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](loss_curve.png)" in text
    assert "A tiny synthetic test run." in text
    assert "\nmodel:\n" in text and "\n  d_model: 128\n" in text and "  seq_len: 128" in text
    assert '  mlp: "gelu"' in text

    final_train = 8.0 * math.exp(-100 / 30) + 1.0
    assert f"| final train loss | {final_train:.4f} |" in text
    assert "| best validation loss | 2.0000 |" in text
    assert "| last validation loss | 2.5000 |" in text
    assert f"| perplexity | {math.exp(2.5):.3f} |" in text
    assert f"| bits per byte | {2.5 / math.log(2) / 4.0:.4f} |" in text
    assert "| tokens/s (median) | 1,055 |" in text
    assert "| MFU (median) | 20.0% |" in text
    assert "| total steps | 100 |" in text
    assert "| parameters | 1234 |" in text
    assert "foo():\n    return 1" in text
    assert "````\nx = ```\n````" in text  # fence longer than the backticks inside


def test_report_without_validation_metrics(tmp_path):
    workdir = str(tmp_path)
    recs = _synthetic(with_eval=False)
    for r in recs:
        del r["mfu"]
    _write_jsonl(workdir, recs)
    text = open(R.write_report(workdir, {"description": "plain dict config"})).read()
    final_train = 8.0 * math.exp(-100 / 30) + 1.0
    assert "| best validation loss | n/a |" in text
    assert "| last validation loss | n/a |" in text
    assert "| bits per byte | n/a |" in text
    assert "| MFU (median) | n/a |" in text
    assert f"| perplexity | {math.exp(final_train):.3f} |" in text
    assert "| wall time | 1m 30s |" in text
    assert (tmp_path / "loss_curve.png").exists()
    assert "_No samples._" in text


def test_report_with_no_metrics(tmp_path):
    workdir = str(tmp_path / "empty")
    text = open(R.write_report(workdir, default_config())).read()
    assert "| final train loss | n/a |" in text
    assert "_No loss metrics were logged._" in text
    assert not os.path.exists(os.path.join(workdir, "loss_curve.png"))


def test_summarize_prefers_logged_bits_per_byte():
    recs = [
        {"step": 1, "split": "train", "loss": 3.0},
        {"step": 1, "split": "eval", "loss": 2.0, "bits_per_byte": 0.9},
    ]
    s = R.summarize(recs)
    assert s["bits_per_byte"] == pytest.approx(0.9)
    assert s["perplexity"] == pytest.approx(math.exp(2.0))
    assert s["wall_time_s"] is None and s["total_steps"] == 1
