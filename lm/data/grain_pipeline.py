"""Trainer-side reading of packed rows with grain: no TensorFlow, sharded per host.

Why: the seqio/TF pipeline slowed the XLA train step of the process that ran it and kept the
whole split in the trainer's memory. Packing now happens once, apart (lm/data/pack.py writes
ArrayRecord files of whole splits); the trainer only reads rows by index through grain.

Which rows a step reads is a pure function of (seed, step), never of the process count, so the
GLOBAL batch at step s is the same on 1 host x 8 devices and on 2 hosts x 4 devices, and host h
of P reads only rows [h*B/P, (h+1)*B/P) of it (`global_rows`):

- slot i of step s has global position p = s*B + i;
- one component of n rows: row = permutation(seed, epoch)[p % n] with epoch = p // n, so every
  row is read once per epoch;
- a mixture draws each slot's component from rng(seed, s) with the rates of step s (the mixture
  schedule) and, for component c, the row permutation_c(seed, p // n_c)[p % n_c];
- a difficulty curriculum (rows packed easiest first) draws slot rows from the easiest
  competence(s) fraction with rng(seed, s);
- the sequence-length warmup shortens rows per step (curriculum.shorten_rows).

The per-host state is grain's own iterator state ({"next_index": step}) plus the rows drawn per
component (for logging mixture proportions); it is JSON and saved per host in checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import grain
import numpy as np

from lm.data.curriculum import Curriculum, shorten_rows

# Features of every batch; a prefix-LM objective adds "prefix" (1 = bidirectional position).
FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")
_STEPS = 2**40  # "infinite": grain's MapDataset needs a length


def batch_features(objective: str) -> tuple[str, ...]:
    """The batch feature names for `data.objective` (lm | mlm | span_corruption)."""
    return FEATURES + (("prefix",) if objective == "span_corruption" else ())


def encode_row(row: dict[str, np.ndarray], features: Sequence[str]) -> bytes:
    """One packed row as one ArrayRecord record: each feature's 4-byte values, in order."""
    return b"".join(
        np.ascontiguousarray(row[k], np.float32 if k == "weights" else np.int32).tobytes()
        for k in features
    )


def decode_row(record: bytes, features: Sequence[str]) -> dict[str, np.ndarray]:
    flat = np.frombuffer(record, np.int32)
    parts = np.split(flat, len(features))
    return {k: p.view(np.float32) if k == "weights" else p for k, p in zip(features, parts)}


class GlobalSampler:
    """Maps a training step to its global batch of (component, row), independent of hosts."""

    def __init__(
        self,
        sizes: Sequence[int],
        rates_at: Callable[[int], np.ndarray],
        batch: int,
        seed: int,
        curriculum: Curriculum | None = None,
    ):
        self.sizes = [int(n) for n in sizes]
        self.rates_at = rates_at
        self.batch = batch
        self.seed = int(seed)
        self.curriculum = curriculum
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, component: int, epoch: int) -> np.ndarray:
        key = (component, epoch)
        if key not in self._perms:
            if len(self._perms) > 2 * len(self.sizes) + 1:
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch, component]))
            self._perms[key] = rng.permutation(self.sizes[component])
        return self._perms[key]

    def components(self, step: int) -> np.ndarray:
        """The component of every slot of global batch `step` [batch]."""
        m = len(self.sizes)
        if m == 1:
            return np.zeros(self.batch, np.int64)
        rng = np.random.Generator(np.random.PCG64([self.seed, step, 1]))
        return rng.choice(m, size=self.batch, p=self.rates_at(step))

    def global_rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(component [batch], row [batch]) of the global batch at `step`."""
        which = self.components(step)
        rows = np.empty(self.batch, np.int64)
        ordered = self.curriculum is not None and self.curriculum.difficulty != "none"
        rng = np.random.Generator(np.random.PCG64([self.seed, step, 2]))
        for c in np.unique(which):
            slots = np.flatnonzero(which == c)
            n = self.sizes[c]
            if ordered:
                available = max(1, math.ceil(self.curriculum.competence(step) * n))
                rows[slots] = rng.integers(0, available, size=len(slots))
                continue
            for i in slots:
                p = step * self.batch + int(i)
                rows[i] = self._perm(int(c), p // n)[p % n]
        return which, rows


class GrainBatchIterator:
    """This host's infinite stream of batches {feature: [batch // P, row_len]} through grain.

    `sources[c]` is indexable by row (a grain ArrayRecordDataSource of encoded rows, or any
    sequence of row dicts / records).
    """

    def __init__(
        self,
        sources: Sequence,
        sampler: GlobalSampler,
        features: Sequence[str],
        process_index: int = 0,
        process_count: int = 1,
        names: tuple[str, ...] = ("main",),
        key: str = "",
        read_threads: int = 2,
        prefetch_batches: int = 16,
    ):
        if sampler.batch % process_count:
            raise ValueError(f"batch {sampler.batch} is not divisible by {process_count} hosts")
        self.names = names
        self._sources = list(sources)
        self._sampler = sampler
        self._features = tuple(features)
        self._host, self._count = process_index, process_count
        self._per_host = sampler.batch // process_count
        self._key = key
        self._taken = [0] * len(self._sources)
        self._last: list[tuple[int, int]] = []
        ds = grain.MapDataset.range(_STEPS).map(self._host_batch)
        self._ds = ds.to_iter_dataset(grain.ReadOptions(read_threads, prefetch_batches))
        self._it = iter(self._ds)

    def _row(self, component: int, row: int) -> dict[str, np.ndarray]:
        rec = self._sources[component][row]
        return decode_row(rec, self._features) if isinstance(rec, bytes) else rec

    def _host_batch(self, step: int) -> dict:
        which, rows = self._sampler.global_rows(int(step))
        lo = self._host * self._per_host
        pairs = [(int(c), int(r)) for c, r in zip(which[lo:], rows[lo:])][: self._per_host]
        got = [self._row(c, r) for c, r in pairs]
        out = {k: np.stack([g[k] for g in got]) for k in self._features}
        cur = self._sampler.curriculum
        if cur is not None:
            out = shorten_rows(out, cur.row_len(int(step)))
        counts = np.bincount(which, minlength=len(self._sources)).tolist()
        return {"batch": out, "rows": pairs, "counts": counts}

    @property
    def rows_taken(self) -> list[int]:
        """Global rows drawn so far from each component (all hosts' shares together)."""
        return list(self._taken)

    def last_global_rows(self) -> list[tuple[int, int]]:
        """(component, row) of every row of this host's last batch."""
        return list(self._last)

    def __iter__(self) -> GrainBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        item = next(self._it)
        self._last = [tuple(p) for p in item["rows"]]
        self._taken = [t + int(n) for t, n in zip(self._taken, item["counts"])]
        return item["batch"]

    def get_state(self) -> dict:
        return {
            "grain": self._it.get_state(),
            "taken": list(self._taken),
            "rows": list(self._sampler.sizes),
            "key": self._key,
            "host": self._host,
            "count": self._count,
            "last_rows": [list(p) for p in self._last],  # (component, row): tests, debugging
        }

    def set_state(self, state: dict) -> None:
        if "grain" not in state:  # a pre-grain checkpoint: {"step", "taken", ...}
            state = {"grain": {"next_index": int(state["step"])}, **state}
        self._it = iter(self._ds)
        self._it.set_state(dict(state["grain"]))
        taken = [int(t) for t in state.get("taken", [])][: len(self._sources)]
        self._taken = taken + [0] * (len(self._sources) - len(taken))
        self._last = []
