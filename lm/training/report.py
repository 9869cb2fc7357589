"""The run report: `<workdir>/report.md`, a set of named sections each command owns.

Why: a run directory should explain itself to someone who did not launch it. `lm train` writes
the summary, loss curve, phase times and samples (derived from `metrics.jsonl`, so a report can
be regenerated for any finished or interrupted run) and the config; `lm eval` writes its
Evaluation section; `lm finetune` its own. Each section starts with a marker line
`<!-- lm:section NAME -->` (invisible when rendered), and `write_report_section` replaces only
the named one, so re-running a finished `lm train` no longer drops what `lm eval` wrote.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Mapping
from typing import Any

from lm import storage
from lm.stages import format_seconds
from lm.training.evaluate import bits_per_byte, perplexity
from lm.training.report_plots import (
    VALIDATION_SPLITS,
    finite_number,
    metric_series,
    plot_expert_load,
    plot_loss_curve,
)
from lm.training.writers import read_metrics

REPORT_FILE = "report.md"
LOSS_CURVE_FILE = "loss_curve.png"
EXPERT_LOAD_FILE = "expert_load.png"
MOE_SCALARS = ("load_balance_loss", "router_z_loss", "dropped_fraction", "router_entropy")


def summarize(records: list[dict]) -> dict[str, float | None]:
    """Final numbers of a run from its metrics records; None where the run did not log them.

    Perplexity and bits per byte use the last validation loss when there is one, else the final
    train loss. Bits per byte needs a logged `bits_per_byte` or `bytes_per_token`.
    """
    train = metric_series(records, ("train",), "loss")
    val = metric_series(records, VALIDATION_SPLITS, "loss")
    final_train = train[-1][1] if train else None
    last_val = val[-1][1] if val else None
    best_val = min(v for _, v in val) if val else None
    ref_loss = last_val if last_val is not None else final_train
    ref_splits = VALIDATION_SPLITS if last_val is not None else ("train",)

    bpb = None
    logged_bpb = metric_series(records, ref_splits, "bits_per_byte")
    if logged_bpb:
        bpb = logged_bpb[-1][1]
    else:
        bpt = metric_series(records, ref_splits, "bytes_per_token") or metric_series(
            records, tuple({"train", *VALIDATION_SPLITS}), "bytes_per_token"
        )
        if ref_loss is not None and bpt and bpt[-1][1] > 0:
            bpb = bits_per_byte(ref_loss, bpt[-1][1])

    tps = [v for _, v in metric_series(records, ("train",), "tokens_per_s")]
    mfus = [v for _, v in metric_series(records, ("train",), "mfu")]
    steps = [int(r["step"]) for r in records if isinstance(r.get("step"), int | float)]

    wall = None
    elapsed = [v for r in records if (v := finite_number(r.get("elapsed_s"))) is not None]
    times = [v for r in records if (v := finite_number(r.get("time"))) is not None]
    if elapsed:
        wall = max(elapsed)
    elif len(times) >= 2:
        wall = max(times) - min(times)

    return {
        "final_train_loss": final_train,
        "best_val_loss": best_val,
        "last_val_loss": last_val,
        "perplexity": perplexity(ref_loss) if ref_loss is not None else None,
        "bits_per_byte": bpb,
        "tokens_per_s_median": statistics.median(tps) if tps else None,
        "mfu_median": statistics.median(mfus) if mfus else None,
        "total_steps": float(max(steps)) if steps else None,
        "wall_time_s": wall,
    }


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _fmt_wall(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def _moe_lines(workdir: str, records: list[dict]) -> list[str]:
    """The report's expert-load section (chart + last MoE scalars); [] for a dense run."""
    png = plot_expert_load(records)
    if png is None:
        return []
    storage.write_bytes(storage.join(workdir, EXPERT_LOAD_FILE), png)
    lines = ["## Expert load", "", f"![expert load]({EXPERT_LOAD_FILE})", ""]
    lines += ["| metric (last train step) | value |", "|---|---|"]
    for name in MOE_SCALARS:
        series = metric_series(records, ("train",), f"moe/{name}")
        lines.append(f"| moe/{name} | {_fmt(series[-1][1] if series else None, '.4g')} |")
    return [*lines, ""]


def _config_dict(config: Any) -> Any:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return config


def _yamlish(value: Any, indent: int = 0) -> list[str]:
    """Nested mappings as `key: value` lines (YAML-like); leaves as compact JSON.

    Compact leaves keep e.g. the mesh rules tuple on one line instead of thirty.
    """
    pad = "  " * indent
    lines = []
    for k in sorted(value, key=str):
        v = value[k]
        if isinstance(v, Mapping) and v:
            lines.append(f"{pad}{k}:")
            lines.extend(_yamlish(v, indent + 1))
        else:
            lines.append(f"{pad}{k}: {json.dumps(v, default=str)}")
    return lines


def _fence(text: str) -> str:
    """A code fence longer than any backtick run in `text`, so samples cannot break out of it."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


# ---- sections: one mechanism for every command that writes into report.md ----

TITLE = "# Run report"
SECTION_MARK = "<!-- lm:section {name} -->"
_MARK = re.compile(r"^<!-- lm:section ([A-Za-z0-9_.-]+) -->[ \t]*$")
_FENCE_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# Where a section goes when the report does not hold it yet: by rank, unknown names at 50.
SECTION_RANK = {"training": 0, "finetune": 10, "evaluation": 30, "config": 90}


def _outside_fences(lines: list[str]) -> list[bool]:
    """For each line, whether it is outside every ``` / ~~~ code fence (CommonMark: a fence
    closes on a line of the same character at least as long, and nothing else)."""
    out, fence = [], None
    for line in lines:
        if fence is None:
            out.append(True)
            m = _FENCE_OPEN.match(line)
            if m:
                fence = m.group(1)
        else:
            out.append(False)
            bare = line.strip()
            if bare and set(bare) == {fence[0]} and len(bare) >= len(fence):
                fence = None
    return out


def _contained(markdown: str) -> str:
    """`markdown` made safe to be one section: a line that would read as a section marker is
    escaped (it shows as text), and a code fence left open is closed."""
    lines = markdown.strip("\n").splitlines()
    outside = _outside_fences(lines)
    safe = [
        line.replace("<!--", "&lt;!--", 1) if free and _MARK.match(line) else line
        for line, free in zip(lines, outside)
    ]
    still_open = _outside_fences([*lines, "x"])[-1] is False
    if still_open:
        fence = next(m.group(1) for m in map(_FENCE_OPEN.match, lines) if m)
        safe.append(fence[0] * 40)
    return "\n".join(safe)


def _legacy_sections(text: str) -> dict[str, str]:
    """The sections of a report written before markers existed: only the "## Evaluation" part
    is another command's (`lm eval`); the rest was the trainer's and is rewritten."""
    lines = text.splitlines()
    outside = _outside_fences(lines)
    heads = [i for i, (line, free) in enumerate(zip(lines, outside)) if free and line[:3] == "## "]
    for k, i in enumerate(heads):
        if lines[i].rstrip() == "## Evaluation":
            end = heads[k + 1] if k + 1 < len(heads) else len(lines)
            return {"evaluation": "\n".join(lines[i:end])}
    return {}


def parse_sections(text: str) -> dict[str, str]:
    """name -> markdown of every marked section of a report, in file order (text before the
    first marker is the title, which `render_sections` writes again)."""
    lines = text.splitlines()
    outside = _outside_fences(lines)
    starts = [
        (i, m.group(1))
        for i, (line, free) in enumerate(zip(lines, outside))
        if free and (m := _MARK.match(line))
    ]
    if not starts:
        return _legacy_sections(text)
    sections = {}
    for k, (i, name) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(lines)
        sections[name] = "\n".join(lines[i + 1 : end]).strip("\n")
    return sections


def render_sections(sections: Mapping[str, str]) -> str:
    """The report text: the title, then every section under its marker."""
    parts = [TITLE, ""]
    for name, markdown in sections.items():
        parts += [SECTION_MARK.format(name=name), markdown.strip("\n"), ""]
    return "\n".join(parts)


def with_section(sections: Mapping[str, str], name: str, markdown: str) -> dict[str, str]:
    """`sections` with `name` replaced in place, or inserted before the first section of a
    higher rank (so a fresh report reads training, fine-tuning, evaluation, config)."""
    if not _MARK.match(SECTION_MARK.format(name=name)):
        raise ValueError(f"report section names are letters, digits, '_', '.', '-': {name!r}")
    body = _contained(markdown)
    if name in sections:
        return {k: body if k == name else v for k, v in sections.items()}
    rank = SECTION_RANK.get(name, 50)
    out: dict[str, str] = {}
    for k, v in sections.items():
        if name not in out and SECTION_RANK.get(k, 50) > rank:
            out[name] = body
        out[k] = v
    out.setdefault(name, body)
    return out


def update_report_section(path: str, name: str, markdown: str) -> str:
    """Replaces (or adds) section `name` of the report at `path`, keeping every other
    section as it is; returns `path`."""
    old = storage.read_text(path) if storage.exists(path) else ""
    storage.write_text(path, render_sections(with_section(parse_sections(old), name, markdown)))
    return path


def write_report_section(workdir: str, name: str, markdown: str) -> str:
    """Replaces (or adds) section `name` of `<workdir>/report.md`, keeping the sections other
    commands wrote (`lm train`: training and config, `lm eval`: evaluation, `lm finetune`:
    finetune). Returns the report's path."""
    storage.makedirs(workdir)
    return update_report_section(storage.join(workdir, REPORT_FILE), name, markdown)


def _summary_lines(summary: dict, command_s: float | None, extra: Mapping[str, Any]) -> list[str]:
    rows = [
        ("final train loss", _fmt(summary["final_train_loss"], ".4f")),
        ("best validation loss", _fmt(summary["best_val_loss"], ".4f")),
        ("last validation loss", _fmt(summary["last_val_loss"], ".4f")),
        ("perplexity", _fmt(summary["perplexity"], ".3f")),
        ("bits per byte", _fmt(summary["bits_per_byte"], ".4f")),
        ("tokens/s (median)", _fmt(summary["tokens_per_s_median"], ",.0f")),
        (
            "MFU (median)",
            "n/a" if summary["mfu_median"] is None else f"{100 * summary['mfu_median']:.1f}%",
        ),
        ("total steps", _fmt(summary["total_steps"], ".0f")),
        ("wall time (training steps)", _fmt_wall(summary["wall_time_s"])),
    ]
    if command_s is not None:
        rows.append(("wall time (whole command)", _fmt_wall(command_s)))
    rows += [(str(k), "n/a" if v is None else str(v)) for k, v in extra.items()]
    return [
        "## Summary",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]


def _phase_lines(phases: list[tuple[str, float]], command_s: float | None) -> list[str]:
    """The "Start-up and phases" table: every named phase of the command with its time, and
    what no phase covers, so the rows add up to the whole command."""
    if not phases:
        return []
    lines = ["## Start-up and phases", ""]
    lines += ["Every phase of this command in order, start-up first.", ""]
    lines += ["| phase | time |", "|---|---:|"]
    lines += [f"| {name} | {format_seconds(seconds)} |" for name, seconds in phases]
    if command_s is not None:
        rest = command_s - sum(seconds for _, seconds in phases)
        if rest >= 0.5:
            lines.append(f"| other (outside the phases above) | {format_seconds(rest)} |")
        lines.append(f"| **whole command** | **{_fmt_wall(command_s)}** |")
    return [*lines, ""]


def _sample_lines(samples: list[tuple[str, str]] | None) -> list[str]:
    lines = ["## Samples", ""]
    if not samples:
        return [*lines, "_No samples._", ""]
    for prompt, completion in samples:
        fence = _fence(prompt + completion)
        lines += ["Prompt:", "", fence, prompt, fence, "", "Completion:", "", fence]
        lines += [completion, fence, ""]
    return lines


def write_report(
    workdir: str,
    config: Any,
    samples: list[tuple[str, str]] | None = None,
    extra: Mapping[str, Any] | None = None,
    phases: list[tuple[str, float]] | None = None,
    command_s: float | None = None,
) -> str:
    """Writes the training and config sections of `<workdir>/report.md` (and `loss_curve.png`
    next to it), keeping every other section; returns the report path.

    `config` is the run's ConfigDict (or a plain dict); `samples` are (prompt, completion) pairs;
    `extra` adds rows (e.g. parameter count, device kind) to the summary table; `phases` are the
    command's named phases with their seconds (`lm.stages.timings()`) and `command_s` its whole
    wall time.
    """
    storage.makedirs(workdir)
    records = read_metrics(workdir)
    summary = summarize(records)
    cfg = _config_dict(config)
    description = ""
    if isinstance(cfg, Mapping):
        description = str(cfg.get("description", "") or "")

    lines = [description or "_No description._", "", f"Workdir: `{workdir}`", ""]
    lines += [*_summary_lines(summary, command_s, extra or {}), ""]
    lines += _phase_lines(phases or [], command_s)
    png = plot_loss_curve(records)
    lines += ["## Loss curve", ""]
    if png is not None:
        storage.write_bytes(storage.join(workdir, LOSS_CURVE_FILE), png)
        lines += [f"![loss curve]({LOSS_CURVE_FILE})", ""]
    else:
        lines += ["_No loss metrics were logged._", ""]
    lines += _moe_lines(workdir, records)
    lines += _sample_lines(samples)
    write_report_section(workdir, "training", "\n".join(lines))

    cfg_lines = _yamlish(cfg) if isinstance(cfg, Mapping) else [json.dumps(cfg, default=str)]
    return write_report_section(
        workdir, "config", "\n".join(["## Config", "", "```yaml", *cfg_lines, "```"])
    )


__all__ = [
    "EXPERT_LOAD_FILE",
    "LOSS_CURVE_FILE",
    "REPORT_FILE",
    "parse_sections",
    "plot_expert_load",
    "plot_loss_curve",
    "summarize",
    "update_report_section",
    "write_report",
    "write_report_section",
]
