"""The ranges and choices of experiment config values, checked before a command does anything.

Why: `--config.train.steps=-5` used to be accepted (a minute of start-up, then a report of
"n/a"), and `--config.data.source=foo` failed deep inside TensorFlow with a 67-line traceback.
`check_values` turns every such value into a one-line `ConfigError` naming the key, the value
and what it may be, before anything is read, trained or written. Checks that need the mesh or
the model (batch divisibility, head counts) stay with the trainer (lm/training/setup.py).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

import ml_collections

from lm.data.objective_names import OBJECTIVES
from lm.data.sources import SOURCES
from lm.errors import ConfigError

# (key, lowest allowed, highest allowed or None, whether the highest is excluded): the ranges
# outside which a run cannot mean anything (a negative step count, a batch of 0 rows).
_BOUNDS = (
    ("model.num_layers", 1, None, False),
    ("model.d_model", 1, None, False),
    ("model.num_heads", 1, None, False),
    ("model.num_kv_heads", 0, None, False),
    ("model.head_dim", 0, None, False),
    ("model.d_ff", 1, None, False),
    ("model.max_seq_len", 1, None, False),
    ("model.vocab_size", 0, None, False),
    ("model.dropout", 0.0, 1.0, True),
    ("model.init_std", 0.0, None, False),
    ("model.num_experts", 0, None, False),
    ("model.sliding_window", 0, None, False),
    ("data.seq_len", 1, None, False),
    ("data.batch_size", 1, None, False),
    ("data.max_documents", 0, None, False),
    ("data.max_file_bytes", 0, None, False),
    ("data.validation_fraction", 0.0, 1.0, True),
    ("data.read_threads", -1, None, False),
    ("data.prefetch_batches", 0, None, False),
    ("tokenizer.vocab_size", 1, None, False),
    ("tokenizer.train_max_bytes", 0, None, False),
    ("tokenizer.extra_ids", 0, None, False),
    ("optim.lr", 0.0, None, False),
    ("optim.warmup_steps", 0, None, False),
    ("optim.min_lr_ratio", 0.0, 1.0, False),
    ("optim.b1", 0.0, 1.0, True),
    ("optim.b2", 0.0, 1.0, True),
    ("optim.eps", 0.0, None, False),
    ("optim.weight_decay", 0.0, None, False),
    ("optim.clip_norm", 0.0, None, False),
    ("optim.grad_accum_steps", 1, None, False),
    ("optim.spike_factor", 0.0, None, False),
    ("optim.max_consecutive_skips", 1, None, False),
    ("train.steps", 1, None, False),
    ("train.log_every", 1, None, False),
    ("train.eval_every", 1, None, False),
    ("train.eval_batches", 1, None, False),
    ("train.checkpoint_every", 1, None, False),
    ("train.keep_checkpoints", 1, None, False),
    ("train.sample_tokens", 0, None, False),
    ("train.steps_per_call", 1, None, False),
    ("train.profile_steps", 0, None, False),
)
# key -> the values it may take.
_CHOICES = {
    "data.source": SOURCES,
    "data.objective": OBJECTIVES,
    "tokenizer.kind": ("bpe", "unigram", "char"),
    "optim.schedule": ("cosine", "linear", "constant"),
}


def _lookup(cfg: ml_collections.ConfigDict, key: str) -> object:
    node: object = cfg
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def _check_bound(key: str, value: object, low: float, high: float | None, open_high: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return  # a type the schema does not know here (a finetune-only group, say)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"--config.{key}={value} must be a finite number")
    if value < low:
        raise ConfigError(f"--config.{key}={value} must be >= {low}")
    if high is not None and (value >= high if open_high else value > high):
        raise ConfigError(f"--config.{key}={value} must be {'<' if open_high else '<='} {high}")


def _check_choice(key: str, value: object, allowed: Sequence[str]) -> None:
    if value in allowed:
        return
    close = difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"--config.{key}={value!r} must be one of {', '.join(allowed)}{hint}")


def check_values(cfg: ml_collections.ConfigDict) -> None:
    """One-line ConfigErrors for values no run can use (`train.steps=-5`, `data.source=foo`),
    raised before anything is read, trained or written."""
    for key, low, high, open_high in _BOUNDS:
        _check_bound(key, _lookup(cfg, key), low, high, open_high)
    for key, allowed in _CHOICES.items():
        value = _lookup(cfg, key)
        if value is not None:
            _check_choice(key, value, allowed)
    mixture = _lookup(cfg, "data.mixture")
    for name, spec in (mixture or {}).items():
        source = spec.get("source") if hasattr(spec, "get") else None
        if source is not None:
            allowed = tuple(s for s in SOURCES if s != "mixture")
            _check_choice(f"data.mixture.{name}.source", source, allowed)
