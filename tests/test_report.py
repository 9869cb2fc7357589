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
    assert "| wall time (training steps) | 1m 30s |" in text
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


def _eval_results(value: float) -> dict:
    """A minimal lm-eval results dict: one task, one metric."""
    return {
        "results": {"py_funcname": {"acc,none": value, "acc_stderr,none": 0.05}},
        "n-samples": {"py_funcname": {"effective": 40}},
        "config": {"limit": 40},
        "lm_step": 100,
    }


def test_a_rerun_train_report_keeps_the_evaluation_section(tmp_path):
    """Re-running a finished `lm train` rewrites its own sections only: the Evaluation section
    `lm eval` wrote survives, once, between the training part and the config."""
    from lm.evaluation.report import write_outputs

    workdir = str(tmp_path)
    _write_jsonl(workdir, _synthetic(with_eval=True))
    report_path = R.write_report(workdir, default_config())
    write_outputs(_eval_results(0.625), str(tmp_path / "eval" / "results.json"), report_path)
    R.write_report(workdir, default_config(), samples=[("def ", "f(): pass")])
    text = open(report_path).read()
    assert text.count("## Evaluation") == 1
    assert "| py_funcname | acc | 0.6250 | 0.0500 | 40 |" in text
    assert text.index("## Summary") < text.index("## Evaluation") < text.index("## Config")
    assert "f(): pass" in text and text.count("## Summary") == 1 and text.count("## Config") == 1

    write_outputs(_eval_results(0.75), str(tmp_path / "eval" / "results.json"), report_path)
    text = open(report_path).read()
    assert "| 0.7500 |" in text and "| 0.6250 |" not in text
    assert text.index("## Summary") < text.index("## Evaluation") < text.index("## Config")


def test_report_sections_are_placed_by_rank_and_kept_verbatim(tmp_path):
    workdir = str(tmp_path)
    R.write_report_section(workdir, "evaluation", "## Evaluation\n\nE")
    R.write_report_section(workdir, "finetune", "## Fine-tuning\n\nF")
    R.write_report_section(workdir, "training", "## Summary\n\nT")
    R.write_report_section(workdir, "notes", "## Notes\n\nN")
    text = (tmp_path / "report.md").read_text()
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads == ["## Summary", "## Fine-tuning", "## Evaluation", "## Notes"]
    assert text.startswith("# Run report\n")
    R.write_report_section(workdir, "finetune", "## Fine-tuning\n\nF2")
    sections = R.parse_sections((tmp_path / "report.md").read_text())
    assert sections == {
        "training": "## Summary\n\nT",
        "finetune": "## Fine-tuning\n\nF2",
        "evaluation": "## Evaluation\n\nE",
        "notes": "## Notes\n\nN",
    }


def test_a_marker_inside_text_is_not_a_section(tmp_path):
    """A sample (fenced) or a description (not fenced) holding a marker line cannot split the
    report: the fenced one is text, the bare one is escaped, an unclosed fence is closed."""
    workdir = str(tmp_path)
    cfg = default_config()
    cfg.description = "<!-- lm:section evaluation -->"
    sample = ("x", "\n<!-- lm:section config -->\n```\n")
    R.write_report(workdir, cfg, samples=[sample])
    R.write_report_section(workdir, "evaluation", "## Evaluation\n\n```\nopen fence")
    R.write_report_section(workdir, "notes", "## Notes\n\nafter")
    sections = R.parse_sections((tmp_path / "report.md").read_text())
    assert list(sections) == ["training", "evaluation", "notes", "config"]
    assert "&lt;!-- lm:section evaluation -->" in sections["training"]
    assert "<!-- lm:section config -->" in sections["training"]  # inside the sample's fence
    assert sections["notes"] == "## Notes\n\nafter"


def test_a_report_from_before_sections_keeps_its_evaluation(tmp_path):
    old = (
        "# Run report\n\n## Summary\n\nold\n\n## Evaluation\n\n| t | acc | 0.5 |\n\n"
        "## Config\n\n```yaml\n## not a heading\n```\n"
    )
    (tmp_path / "report.md").write_text(old)
    R.write_report(str(tmp_path), default_config())
    text = (tmp_path / "report.md").read_text()
    assert text.count("## Evaluation") == 1 and "| t | acc | 0.5 |" in text
    assert "\nold\n" not in text and "## not a heading" not in text


def test_report_names_every_phase_and_the_whole_command(tmp_path):
    workdir = str(tmp_path)
    _write_jsonl(workdir, _synthetic(with_eval=False))  # steps span 90 s
    phases = [("training the tokenizer", 31.0), ("packing the data", 22.0), ("steps", 90.0)]
    text = open(R.write_report(workdir, default_config(), phases=phases, command_s=150.0)).read()
    assert "| training the tokenizer | 31.0s |" in text
    assert "| packing the data | 22.0s |" in text
    assert "| other (outside the phases above) | 7.0s |" in text
    assert "| **whole command** | **2m 30s** |" in text
    assert "| wall time (training steps) | 1m 30s |" in text
    assert "| wall time (whole command) | 2m 30s |" in text
