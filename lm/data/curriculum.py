"""Curriculum schedules: sequence-length warmup, easy-to-hard ordering, step-dependent mixtures.

All three are pure functions of the training step, so a resumed run follows the same schedule:

- **Sequence-length warmup** (Li et al. 2022, "The Stability-Efficiency Dilemma"): early steps
  train on short rows. A packed row [seq_len] is cut into seq_len / l rows of length l, so every
  step still sees the same tokens; l doubles from `seq_len_start` up to `seq_len` in equal
  stages over `seq_len_warmup_steps` (a handful of shapes, so a handful of compilations).
- **Difficulty ordering** (Platanios et al. 2019, competence-based curriculum): documents are
  scored (`length`: tokens; `rarity`: mean negative log unigram probability of their tokens),
  packed easiest first, and step t samples only from the easiest c(t) fraction of rows, with
  c(t) = min(1, sqrt(t (1 - c0^2) / T + c0^2)).
- **Mixture schedule**: each mixture component's rate moves linearly from `rate` to
  `final_rate` over `mixture_steps` (see lm/data/mixture.py).
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections
import numpy as np

from lm.errors import DataError

DIFFICULTIES = ("none", "length", "rarity")


@dataclasses.dataclass(frozen=True)
class Curriculum:
    """The resolved `data.curriculum` group for one run."""

    seq_len: int
    seq_len_start: int
    seq_len_warmup_steps: int
    difficulty: str
    competence_start: float
    competence_steps: int
    mixture_steps: int

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> Curriculum:
        """Validates `cfg.data.curriculum`; 0 competence_steps means half of train.steps."""
        cur = cfg.data.curriculum
        seq_len = int(cfg.data.seq_len)
        start = int(cur.seq_len_start) if cur.seq_len_warmup_steps > 0 else seq_len
        ratio = seq_len // start if 0 < start <= seq_len else 0
        if ratio < 1 or seq_len % start or ratio & (ratio - 1):
            raise DataError(
                f"data.curriculum.seq_len_start={cur.seq_len_start} must divide "
                f"data.seq_len={seq_len} by a power of two (e.g. {seq_len // 4})"
            )
        if cur.difficulty not in DIFFICULTIES:
            raise DataError(
                f"data.curriculum.difficulty={cur.difficulty!r}; expected one of {DIFFICULTIES}"
            )
        if not 0.0 < cur.competence_start <= 1.0:
            raise DataError("data.curriculum.competence_start must be in (0, 1]")
        return cls(
            seq_len=seq_len,
            seq_len_start=start,
            seq_len_warmup_steps=int(cur.seq_len_warmup_steps),
            difficulty=cur.difficulty,
            competence_start=float(cur.competence_start),
            competence_steps=int(cur.competence_steps) or max(1, int(cfg.train.steps) // 2),
            mixture_steps=int(cur.mixture_steps),
        )

    def row_len(self, step: int) -> int:
        """Row length at `step`: seq_len_start, doubling in equal stages, then seq_len."""
        if step >= self.seq_len_warmup_steps or self.seq_len_start == self.seq_len:
            return self.seq_len
        stages = int(math.log2(self.seq_len // self.seq_len_start)) + 1
        stage = step * stages // self.seq_len_warmup_steps
        return self.seq_len_start * 2**stage

    def row_lengths(self) -> list[int]:
        """Every row length the schedule uses, shortest first."""
        return sorted({self.row_len(s) for s in range(self.seq_len_warmup_steps + 1)})

    def competence(self, step: int) -> float:
        """Fraction of rows (easiest first) that step `step` may draw from."""
        if self.difficulty == "none":
            return 1.0
        c0 = self.competence_start
        return min(1.0, math.sqrt(step * (1 - c0 * c0) / self.competence_steps + c0 * c0))

    def mixture_progress(self, step: int) -> float:
        """0 at step 0 (rates = `rate`), 1 from `mixture_steps` on (rates = `final_rate`)."""
        if self.mixture_steps <= 0:
            return 0.0
        return min(1.0, step / self.mixture_steps)


def document_scores(docs: list[np.ndarray], difficulty: str) -> np.ndarray:
    """Difficulty per tokenized document [n_docs]; larger is harder.

    `length`: number of tokens. `rarity`: mean -log p(token) under the unigram distribution of
    these documents (rare-word content is harder to predict).
    """
    if difficulty == "length":
        return np.array([len(d) for d in docs], np.float64)
    if difficulty == "rarity":
        if not docs:
            return np.zeros(0)
        all_tokens = np.concatenate(docs)
        counts = np.bincount(all_tokens, minlength=int(all_tokens.max()) + 1)
        surprisal = -np.log(counts / counts.sum() + 1e-12)
        return np.array([surprisal[d].mean() if len(d) else 0.0 for d in docs])
    raise DataError(f"no document score for difficulty={difficulty!r}")


def order_pieces_by_difficulty(
    pieces: list[np.ndarray], eos_id: int, difficulty: str
) -> list[np.ndarray]:
    """Reorders document pieces so whole documents come easiest first (stable for ties).

    `pieces` are consecutive <= seq_len cuts of documents, the last piece of each ending in
    `eos_id`; a document's pieces stay together and in order.
    """
    groups, current = [], []
    for piece in pieces:
        current.append(piece)
        if len(piece) and piece[-1] == eos_id:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    scores = document_scores([np.concatenate(g) for g in groups], difficulty)
    order = np.argsort(scores, kind="stable")
    return [piece for i in order for piece in groups[i]]


def shorten_rows(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Cuts every row [batch, L] into L / length rows [batch * L / length, length].

    Positions restart at 0 wherever a document continues from the previous cut, so a short row
    looks like short documents; segment ids stay distinct within each row.
    """
    rows, full = batch["targets"].shape
    if length == full:
        return batch
    out = {
        k: np.ascontiguousarray(v).reshape(rows * full // length, length) for k, v in batch.items()
    }
    seg, pos = out["segment_ids"], out["positions"]
    starts = np.ones_like(seg, dtype=bool)
    starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = np.maximum.accumulate(np.where(starts, np.arange(length)[None, :], 0), axis=1)
    base = np.take_along_axis(pos, first, axis=1)
    out["positions"] = (pos - base).astype(pos.dtype)
    return out
