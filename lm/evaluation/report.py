"""lm-eval's results as the files a run keeps: results.json, results.md, and a report section.

The markdown table has one row per (task or group, metric): value, ± standard error (lm-eval's;
"—" where it has none, e.g. perplexities) and n, the number of docs scored. The same table
goes into the run's report.md as its "evaluation" section (lm/training/report.py's
`update_report_section`: an earlier one is replaced, the sections other commands wrote are kept).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from lm_eval.utils import handle_non_serializable

from lm import storage

SECTION = "## Evaluation"
REPORT_SECTION = "evaluation"  # its name among report.md's sections


def json_safe(results: dict) -> dict:
    """lm-eval's results dict with numpy values, functions and NaNs made JSON-safe."""

    def default(value: Any) -> Any:
        try:
            return handle_non_serializable(value)
        except Exception:  # handle_non_serializable covers numpy/sets; the rest as text
            return str(value)

    text = json.dumps(results, default=default, allow_nan=True)
    return _finite(json.loads(text))


def _finite(value: Any) -> Any:
    """NaN/inf (which lm-eval writes for a missing stderr) become None, valid in strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def metric_rows(results: dict) -> list[dict]:
    """[{task, metric, value, stderr, n}] for every task and aggregated group, in lm-eval's
    order. `metric` includes its filter when not "none" (e.g. "exact_match (strict)")."""
    rows = []
    n_samples = results.get("n-samples", {})
    subtasks = results.get("group_subtasks", {})
    for section in ("results", "groups"):
        for name, metrics in results.get(section, {}).items():
            if section == "results" and name in results.get("groups", {}):
                continue  # a group's aggregate is listed from "groups"
            n = n_samples.get(name, {}).get("effective")
            if n is None and name in subtasks:
                n = sum(n_samples.get(t, {}).get("effective", 0) for t in subtasks[name])
            for key, value in metrics.items():
                if "," not in key or "_stderr," in key:
                    continue
                metric, filt = key.split(",", 1)
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                rows.append(
                    {
                        "task": name,
                        "metric": metric if filt == "none" else f"{metric} ({filt})",
                        "value": value,
                        "stderr": stderr if isinstance(stderr, (int, float)) else None,
                        "n": n,
                    }
                )
    return rows


def _number(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if not math.isfinite(value):
        return "—"
    return f"{value:.4g}" if abs(value) >= 1e5 else f"{value:.4f}"


def markdown_table(results: dict) -> str:
    """| task | metric | value | ± stderr | n | for every row of `metric_rows`."""
    lines = ["| task | metric | value | ± stderr | n |", "|---|---|---:|---:|---:|"]
    for row in metric_rows(results):
        stderr = "—" if row["stderr"] is None else _number(row["stderr"])
        n = "" if row["n"] is None else str(row["n"])
        lines.append(
            f"| {row['task']} | {row['metric']} | {_number(row['value'])} | {stderr} | {n} |"
        )
    return "\n".join(lines) + "\n"


def section_text(results: dict, details: str = "eval/results.json") -> str:
    """The report's "## Evaluation" section: what was run, then the table."""
    cfg = results.get("config", {})
    bits = [f"step {results['lm_step']}" if results.get("lm_step") is not None else None]
    if cfg.get("limit") is not None:
        bits.append(f"limit {cfg['limit']} docs per task")
    shots = sorted(set(results.get("n-shot", {}).values()))
    if shots:
        bits.append("num_fewshot " + "/".join(str(s) for s in shots))
    head = ", ".join(b for b in bits if b)
    return (
        f"{SECTION}\n\nlm-evaluation-harness ({head}); details in `{details}`.\n\n"
        + markdown_table(results)
    )


def write_outputs(results: dict, json_path: str, report_path: str | None) -> str:
    """Writes results JSON at `json_path` and the table beside it (.md); updates the report's
    section when `report_path` is given. Returns the table."""
    table = markdown_table(results)
    storage.write_text(json_path, json.dumps(results, indent=2, sort_keys=True) + "\n")
    md_path = json_path[: -len(".json")] if json_path.endswith(".json") else json_path
    storage.write_text(md_path + ".md", "# Evaluation\n\n" + table)
    if report_path is not None:
        from lm.training.report import update_report_section

        details = os.path.relpath(json_path, os.path.dirname(report_path) or ".")
        details = json_path if details.startswith("..") or storage.is_remote(json_path) else details
        update_report_section(report_path, REPORT_SECTION, section_text(results, details))
    return table
