"""The end-of-run report: `<workdir>/report.md` with config, summary numbers, loss curve, samples.

Why: a run directory should explain itself to someone who did not launch it. Everything here is
derived from `metrics.jsonl` (written by `MetricsWriter`), so a report can be regenerated for any
finished or interrupted run without the model.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from collections.abc import Mapping
from typing import Any

from lm import storage
from lm.training.evaluate import bits_per_byte, perplexity
from lm.training.writers import read_metrics

REPORT_FILE = "report.md"
LOSS_CURVE_FILE = "loss_curve.png"
EXPERT_LOAD_FILE = "expert_load.png"
MOE_SCALARS = ("load_balance_loss", "router_z_loss", "dropped_fraction", "router_entropy")
VALIDATION_SPLITS = ("eval", "valid", "validation", "val")


def _num(v: Any) -> float | None:
    """A finite float, or None for missing/non-numeric/NaN values."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _series(records: list[dict], splits: tuple[str, ...], key: str) -> list[tuple[int, float]]:
    """(step, value) for records of `splits` with a finite `key`, sorted by step, last wins."""
    by_step: dict[int, float] = {}
    for r in records:
        if r.get("split", "train") not in splits:
            continue
        v = _num(r.get(key))
        if v is not None and isinstance(r.get("step"), int | float):
            by_step[int(r["step"])] = v
    return sorted(by_step.items())


def summarize(records: list[dict]) -> dict[str, float | None]:
    """Final numbers of a run from its metrics records; None where the run did not log them.

    Perplexity and bits per byte use the last validation loss when there is one, else the final
    train loss. Bits per byte needs a logged `bits_per_byte` or `bytes_per_token`.
    """
    train = _series(records, ("train",), "loss")
    val = _series(records, VALIDATION_SPLITS, "loss")
    final_train = train[-1][1] if train else None
    last_val = val[-1][1] if val else None
    best_val = min(v for _, v in val) if val else None
    ref_loss = last_val if last_val is not None else final_train
    ref_splits = VALIDATION_SPLITS if last_val is not None else ("train",)

    bpb = None
    logged_bpb = _series(records, ref_splits, "bits_per_byte")
    if logged_bpb:
        bpb = logged_bpb[-1][1]
    else:
        bpt = _series(records, ref_splits, "bytes_per_token") or _series(
            records, tuple({"train", *VALIDATION_SPLITS}), "bytes_per_token"
        )
        if ref_loss is not None and bpt and bpt[-1][1] > 0:
            bpb = bits_per_byte(ref_loss, bpt[-1][1])

    tps = [v for _, v in _series(records, ("train",), "tokens_per_s")]
    mfus = [v for _, v in _series(records, ("train",), "mfu")]
    steps = [int(r["step"]) for r in records if isinstance(r.get("step"), int | float)]

    wall = None
    elapsed = [v for r in records if (v := _num(r.get("elapsed_s"))) is not None]
    times = [v for r in records if (v := _num(r.get("time"))) is not None]
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


def _figure(width: float, height: float):
    """A headless matplotlib Figure (the Agg canvas: no display, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_loss_curve(records: list[dict]) -> bytes | None:
    """PNG bytes of train loss vs step with validation points; None when nothing to plot.

    Uses the object-oriented Agg canvas (no pyplot), so it neither needs a display nor changes the
    global matplotlib backend of the calling process. The y axis is logarithmic when the loss spans
    more than a factor of 3, which keeps the late, slow part of training readable.
    """
    from matplotlib.ticker import FuncFormatter

    train = _series(records, ("train",), "loss")
    val = _series(records, VALIDATION_SPLITS, "loss")
    if not train and not val:
        return None
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train", lw=1.2)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation", ms=4, lw=1)
    values = [v for _, v in train + val]
    if min(values) > 0 and max(values) / min(values) > 3:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _png(fig)


def last_expert_load(records: list[dict]) -> tuple[int, list[float]] | None:
    """(step, per-expert load) of the last train record with `moe/expert_load` (the fraction of
    token-to-expert assignments per expert, averaged over MoE layers); None for a dense run."""
    found = None
    for r in records:
        load = r.get("moe/expert_load")
        if r.get("split", "train") == "train" and isinstance(load, list) and load:
            values = [_num(v) for v in load]
            if all(v is not None for v in values) and isinstance(r.get("step"), int | float):
                if found is None or int(r["step"]) >= found[0]:
                    found = (int(r["step"]), values)
    return found


def plot_expert_load(records: list[dict]) -> bytes | None:
    """PNG bytes of a bar chart of the last logged per-expert load, with the balanced level
    1/E as a line, so routing collapse (a few tall bars) is visible at a glance."""
    found = last_expert_load(records)
    if found is None:
        return None
    step, load = found
    fig = _figure(7, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(load)), load, color="tab:blue")
    ax.axhline(1.0 / len(load), color="tab:red", ls="--", lw=1, label="balanced (1/E)")
    ax.set_xlabel("expert")
    ax.set_ylabel("fraction of assignments")
    ax.set_title(f"expert load at step {step} (mean over MoE layers)")
    if len(load) <= 32:
        ax.set_xticks(range(len(load)))
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    return _png(fig)


def _moe_lines(workdir: str, records: list[dict]) -> list[str]:
    """The report's expert-load section (chart + last MoE scalars); [] for a dense run."""
    png = plot_expert_load(records)
    if png is None:
        return []
    storage.write_bytes(storage.join(workdir, EXPERT_LOAD_FILE), png)
    lines = ["## Expert load", "", f"![expert load]({EXPERT_LOAD_FILE})", ""]
    lines += ["| metric (last train step) | value |", "|---|---|"]
    for name in MOE_SCALARS:
        series = _series(records, ("train",), f"moe/{name}")
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


def write_report(
    workdir: str,
    config: Any,
    samples: list[tuple[str, str]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Writes `<workdir>/report.md` (and `loss_curve.png` next to it); returns the report path.

    `config` is the run's ConfigDict (or a plain dict); `samples` are (prompt, completion) pairs;
    `extra` adds rows (e.g. parameter count, device kind) to the summary table.
    """
    storage.makedirs(workdir)
    records = read_metrics(workdir)
    summary = summarize(records)
    cfg = _config_dict(config)
    description = ""
    if isinstance(cfg, Mapping):
        description = str(cfg.get("description", "") or "")

    lines = ["# Run report", ""]
    lines += [description or "_No description._", ""]
    lines += [f"Workdir: `{workdir}`", ""]

    lines += ["## Summary", "", "| metric | value |", "|---|---|"]
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
        ("wall time", _fmt_wall(summary["wall_time_s"])),
    ]
    for k, v in (extra or {}).items():
        rows.append((str(k), "n/a" if v is None else str(v)))
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines.append("")

    png = plot_loss_curve(records)
    lines += ["## Loss curve", ""]
    if png is not None:
        storage.write_bytes(storage.join(workdir, LOSS_CURVE_FILE), png)
        lines += [f"![loss curve]({LOSS_CURVE_FILE})", ""]
    else:
        lines += ["_No loss metrics were logged._", ""]
    lines += _moe_lines(workdir, records)

    lines += ["## Samples", ""]
    if samples:
        for prompt, completion in samples:
            fence = _fence(prompt + completion)
            lines += ["Prompt:", "", fence, prompt, fence, "", "Completion:", "", fence]
            lines += [completion, fence, ""]
    else:
        lines += ["_No samples._", ""]

    if isinstance(cfg, Mapping):
        cfg_lines = _yamlish(cfg)
    else:
        cfg_lines = [json.dumps(cfg, default=str)]
    lines += ["## Config", "", "```yaml", *cfg_lines, "```", ""]

    path = storage.join(workdir, REPORT_FILE)
    storage.write_text(path, "\n".join(lines))
    return path


__all__ = [
    "EXPERT_LOAD_FILE",
    "LOSS_CURVE_FILE",
    "REPORT_FILE",
    "plot_expert_load",
    "plot_loss_curve",
    "summarize",
    "write_report",
]
