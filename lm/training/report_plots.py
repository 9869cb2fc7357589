"""The report's numbers per step and its figures: metric series from `metrics.jsonl` records,
the loss curve and the expert-load chart (lm/training/report.py writes them into report.md)."""

from __future__ import annotations

import io
import math
from typing import Any

VALIDATION_SPLITS = ("eval", "valid", "validation", "val")


def finite_number(v: Any) -> float | None:
    """A finite float, or None for missing/non-numeric/NaN values."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def metric_series(
    records: list[dict], splits: tuple[str, ...], key: str
) -> list[tuple[int, float]]:
    """(step, value) for records of `splits` with a finite `key`, sorted by step, last wins."""
    by_step: dict[int, float] = {}
    for r in records:
        if r.get("split", "train") not in splits:
            continue
        v = finite_number(r.get(key))
        if v is not None and isinstance(r.get("step"), int | float):
            by_step[int(r["step"])] = v
    return sorted(by_step.items())


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

    train = metric_series(records, ("train",), "loss")
    val = metric_series(records, VALIDATION_SPLITS, "loss")
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
            values = [finite_number(v) for v in load]
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
