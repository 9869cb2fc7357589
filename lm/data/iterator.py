"""The checkpointable training batch iterator over packed rows of one or more components.

Every step is a pure function of (seed, host, step) and the per-component counters in the state:

- which component each of the `batch` rows comes from: one draw per row with the mixture rates
  of that step (`numpy.random.Generator(PCG64([seed, host, step]))`);
- which rows: each component is read as an endless stream of per-epoch permutations of its rows
  (epoch e from (seed, host, e)), so every row is seen once per epoch; under a difficulty
  curriculum, rows are kept easiest first and a step samples from the easiest c(step) of them;
- the row length: the sequence-length warmup cuts rows shorter in early steps.

The state is {"step", "taken" (rows read per component), ...}: JSON, saved in every checkpoint,
and `set_state` makes the next batch exactly the one the saved iterator would have produced.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from lm.data.curriculum import Curriculum, shorten_rows

# Features of every batch; a prefix-LM objective adds "prefix" (1 = bidirectional position).
FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")


def batch_features(objective: str) -> tuple[str, ...]:
    """The batch feature names for `data.objective` (lm | mlm | span_corruption)."""
    return FEATURES + (("prefix",) if objective == "span_corruption" else ())


class PackedBatchIterator:
    """Infinite, deterministic batches {feature: [rows, row_len]} drawn from packed rows.

    `components` holds each component's rows {feature: [n_i, seq_len]}; `rates_at(step)` gives
    the component sampling rates [n_components] for a step.
    """

    def __init__(
        self,
        components: list[dict[str, np.ndarray]],
        rates_at,
        batch: int,
        seed: int,
        host: int,
        key: str,
        curriculum: Curriculum | None = None,
        names: tuple[str, ...] = ("main",),
    ):
        self.names = names  # component names, for logging the mixture proportions
        self._components = components
        self._sizes = [int(c["targets"].shape[0]) for c in components]
        self._rates_at = rates_at
        self._batch = batch
        self._seed = seed
        self._host = host
        self._key = key
        self._curriculum = curriculum
        self._step = 0
        self._taken = [0] * len(components)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def rows_taken(self) -> list[int]:
        """Rows drawn so far from each component (resumed runs included)."""
        return list(self._taken)

    def _perm(self, component: int, epoch: int) -> np.ndarray:
        if (component, epoch) not in self._perms:
            if len(self._perms) > 2 * len(self._components) + 1:
                self._perms.pop(next(iter(self._perms)))
            seeds = [self._seed, self._host, epoch] + ([component] if component else [])
            rng = np.random.Generator(np.random.PCG64(seeds))
            self._perms[(component, epoch)] = rng.permutation(self._sizes[component])
        return self._perms[(component, epoch)]

    def _stream(self, component: int, count: int) -> np.ndarray:
        """The next `count` row indices of the component's epoch-permutation stream."""
        n, start = self._sizes[component], self._taken[component]
        self._taken[component] += count
        first, last = start // n, (start + count - 1) // n
        if first == last:
            offset = start - first * n
            return self._perm(component, first)[offset : offset + count]
        pos = np.arange(start, start + count)
        return np.array([self._perm(component, int(p // n))[p % n] for p in pos])

    def _easiest(self, component: int, count: int, rng: np.random.Generator) -> np.ndarray:
        """`count` rows drawn from the easiest competence(step) fraction (rows are sorted)."""
        available = max(
            1, math.ceil(self._curriculum.competence(self._step) * self._sizes[component])
        )
        self._taken[component] += count
        return rng.choice(available, size=count, replace=available < count)

    def __iter__(self) -> PackedBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.Generator(np.random.PCG64([self._seed, self._host, self._step, 1]))
        m = len(self._components)
        which = (
            np.zeros(self._batch, np.int64)
            if m == 1
            else rng.choice(m, size=self._batch, p=self._rates_at(self._step))
        )
        ordered = self._curriculum is not None and self._curriculum.difficulty != "none"
        out = {
            k: np.empty((self._batch, *v.shape[1:]), v.dtype)
            for k, v in self._components[0].items()
        }
        for i in range(m):
            slots = np.flatnonzero(which == i)
            if not len(slots):
                continue
            idx = self._easiest(i, len(slots), rng) if ordered else self._stream(i, len(slots))
            for k, v in self._components[i].items():
                out[k][slots] = v[idx]
        if self._curriculum is not None:
            out = shorten_rows(out, self._curriculum.row_len(self._step))
        self._step += 1
        return out

    def get_state(self) -> dict:
        return {
            "step": self._step,
            "taken": list(self._taken),
            "rows": self._sizes,
            "seed": self._seed,
            "key": self._key,
        }

    def set_state(self, state: dict) -> None:
        rows = state.get("rows")
        rows = [rows] if isinstance(rows, int) else rows
        if state.get("key") != self._key or rows != self._sizes:
            logging.warning(
                "data: resuming an iterator saved for different data (%s rows, key %s; now %s "
                "rows, key %s): the batch order will differ",
                rows,
                state.get("key"),
                self._sizes,
                self._key,
            )
        self._step = int(state["step"])
        taken = state.get("taken", [self._step * self._batch] * len(self._sizes))
        self._taken = [int(t) for t in taken][: len(self._sizes)]
        self._taken += [0] * (len(self._sizes) - len(self._taken))
