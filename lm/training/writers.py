"""`<workdir>/metrics.jsonl` (the source of truth, read back by the report) and TensorBoard
event files (the live view), written through the storage layer so a `gs://` workdir works.

Only the primary host writes; on other hosts every method is a no-op, so the trainer calls the
writer unconditionally. Object stores cannot append, so the JSONL file is kept in memory and
rewritten whole at each write (metrics are small: one line per logged step).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any

from lm import storage

METRICS_FILE = "metrics.jsonl"


def _parse_lines(text: str) -> list[dict]:
    """JSON objects, one per line; a torn last line (crash mid-write) is skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def read_metrics(workdir: str) -> list[dict]:
    """All records of `<workdir>/metrics.jsonl` in file order ([] when there is none)."""
    path = storage.join(workdir, METRICS_FILE)
    return _parse_lines(storage.read_text(path)) if storage.exists(path) else []


def _json_value(v: Any) -> Any:
    """Scalars (python, numpy, 0-d jax arrays) as JSON-able python values; NaN/inf kept as str.
    A vector metric (a list, tuple or 1-d array, e.g. moe/expert_load) becomes a JSON list."""
    if isinstance(v, bool | int | str) or v is None:
        return v
    if isinstance(v, list | tuple) or getattr(v, "ndim", 0) > 0:
        return [_json_value(x) for x in list(v)]
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isfinite(f):
        if isinstance(v, float):
            return f
        return int(f) if f.is_integer() and "int" in type(v).__name__.lower() else f
    return str(f)  # "nan", "inf": json.dumps would write invalid JSON otherwise.


class MetricsWriter:
    """Appends records to metrics.jsonl and TensorBoard (`<workdir>/tb/<split>`).

    A resumed run calls `truncate_after(step)` once: records at or after the resumed step are
    dropped (they are logged again), so no step appears twice and nothing before it is lost.
    Each record gets a `time` field (unix seconds) unless one is given; the report uses it.
    """

    def __init__(self, workdir: str, *, is_primary: bool = True, tensorboard: bool = True):
        self.workdir = workdir
        self.is_primary = is_primary
        self.path = storage.join(workdir, METRICS_FILE)
        self._tensorboard = tensorboard
        self._tb_writers: dict[str, Any] = {}
        self._lines: list[str] = []
        if is_primary:
            storage.makedirs(workdir)
            if storage.exists(self.path):
                text = storage.read_text(self.path)
                self._lines = [ln for ln in text.splitlines() if ln.strip()]

    def _flush(self) -> None:
        storage.write_text(self.path, "".join(ln + "\n" for ln in self._lines))

    def truncate_after(self, step: int) -> int:
        """Drops records with step >= `step` (and torn lines); returns how many were dropped.

        TensorBoard events cannot be rewritten; TensorBoard shows the newer points on top.
        """
        if not self.is_primary:
            return 0
        kept = []
        for line in self._lines:
            records = _parse_lines(line)
            s = records[0].get("step") if records else None
            if records and not (isinstance(s, int | float) and s >= step):
                kept.append(line)
        dropped = len(self._lines) - len(kept)
        if dropped:
            self._lines = kept
            self._flush()
        return dropped

    def _tb_writer(self, split: str):
        writer = self._tb_writers.get(split)
        if writer is None:
            from lm.training.tensorboard import EventWriter

            writer = EventWriter(storage.join(self.workdir, "tb", split))
            self._tb_writers[split] = writer
        return writer

    def write(self, step: int, metrics: Mapping[str, Any], split: str = "train") -> None:
        """Records `metrics` at `step` under `split` ("train", "validation", ...). Values are
        scalars or vectors; TensorBoard gets a vector as one scalar per entry, `<name>/<i>`."""
        if not self.is_primary:
            return
        record: dict[str, Any] = {"step": int(step), "split": split}
        for k, v in metrics.items():
            if k not in ("step", "split"):
                record[k] = _json_value(v)
        record.setdefault("time", time.time())
        self._lines.append(json.dumps(record))
        self._flush()
        if self._tensorboard:
            scalars = {}
            for k, v in record.items():
                if k in ("step", "split", "time"):
                    continue
                if isinstance(v, list):
                    for i, x in enumerate(v):
                        if isinstance(x, int | float) and not isinstance(x, bool):
                            scalars[f"{k}/{i}"] = float(x)
                    continue
                try:
                    scalars[k] = float(v)
                except (TypeError, ValueError):
                    continue
            self._tb_writer(split).scalars(int(step), scalars, record["time"])

    def close(self) -> None:
        for writer in self._tb_writers.values():
            writer.close()
        self._tb_writers.clear()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
