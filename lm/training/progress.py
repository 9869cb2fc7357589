"""The terminal progress line of a training run: step, loss, lr, grad norm, tokens/s, MFU, ETA."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from lm.stages import LIVE


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _fmt_num(v: float | None, spec: str) -> str:
    if v is None:
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return format(f, spec) if math.isfinite(f) else str(f)


def _first(metrics: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in metrics and metrics[k] is not None:
            return metrics[k]
    return None


class ProgressLine:
    """Prints one status line per logged step; overwritten in place (carriage return) on a TTY.

    Only the primary host prints (`is_primary`); elsewhere every method is a no-op. Keys read:
    loss, lr (or learning_rate), grad_norm, tokens_per_s, step_ms (or step_time_s), mfu.
    """

    def __init__(
        self,
        *,
        total_steps: int | None = None,
        stream: TextIO | None = None,
        is_primary: bool = True,
    ) -> None:
        self.total_steps = total_steps
        self.is_primary = is_primary
        self._stream = stream
        self._start: tuple[float, int] | None = None

    def _eta_seconds(self, step: int, metrics: Mapping[str, Any]) -> float | None:
        if not self.total_steps:
            return None
        remaining = max(0, self.total_steps - step)
        now = time.monotonic()
        if self._start is None:
            self._start = (now, step)
        t0, s0 = self._start
        if step > s0 and now > t0:
            return remaining * (now - t0) / (step - s0)
        step_ms = _step_ms(metrics)
        return None if step_ms is None else remaining * float(step_ms) / 1e3

    def format(self, step: int, metrics: Mapping[str, Any]) -> str:
        """The line for `step` (no carriage return)."""
        total = f"/{self.total_steps}" if self.total_steps else ""
        width = len(str(self.total_steps)) if self.total_steps else 0
        m = _first(metrics, "mfu")
        eta = self._eta_seconds(step, metrics)
        parts = [
            f"step {step:>{width}d}{total}",
            f"loss {_fmt_num(_first(metrics, 'loss'), '.4f')}",
            f"lr {_fmt_num(_first(metrics, 'lr', 'learning_rate'), '.2e')}",
            f"gnorm {_fmt_num(_first(metrics, 'grad_norm'), '.3f')}",
            f"tok/s {_fmt_num(_first(metrics, 'tokens_per_s'), ',.0f')}",
            f"step {_fmt_num(_step_ms(metrics), '.1f')}ms",
            f"MFU {_fmt_num(None if m is None else 100 * float(m), '.1f')}"
            + ("%" if m is not None else ""),
            f"ETA {_fmt_duration(eta) if eta is not None else 'n/a'}",
        ]
        return " | ".join(parts)

    def show(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.is_primary:
            return
        LIVE.show(self.format(step, metrics), self._stream or sys.stdout)

    def note(self, text: str) -> None:
        """A line of its own (a validation result) that the progress line then redraws under."""
        if not self.is_primary:
            return
        LIVE.end()
        stream = self._stream or sys.stdout
        stream.write(text + "\n")
        stream.flush()

    def close(self) -> None:
        """Ends an open carriage-return line."""
        LIVE.end()


def _step_ms(metrics: Mapping[str, Any]) -> float | None:
    step_ms = _first(metrics, "step_ms")
    if step_ms is None and _first(metrics, "step_time_s") is not None:
        step_ms = float(metrics["step_time_s"]) * 1e3
    return step_ms
