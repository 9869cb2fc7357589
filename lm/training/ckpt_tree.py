"""Comparing a checkpoint's tree of arrays with the one a config expects: the first
parameter whose presence or shape differs, and weight-quantized vs full train states."""

from __future__ import annotations

from typing import Any

import jax


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes(tree: Any) -> dict[str, tuple]:
    """`a.b.0.c` -> shape for every array leaf (None leaves, e.g. empty optax states, dropped)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, x in leaves:
        name = ".".join(_key_name(k) for k in path)
        out[name.removesuffix(".value")] = tuple(x.shape)  # nnx.Variable's own field
    return out


def first_mismatch(saved: Any, expected: Any) -> str | None:
    """One line naming the first parameter whose presence or shape differs, or None."""
    have, want = _shapes(saved), _shapes(expected)
    for name, shape in want.items():
        if name not in have:
            return f"{name} (shape {shape}) is missing from the checkpoint"
        if have[name] != shape:
            return f"{name} has shape {have[name]} in the checkpoint but {shape} in this config"
    extra = [name for name in have if name not in want]
    if extra:
        return f"{extra[0]} (shape {have[extra[0]]}) is in the checkpoint but not in this config"
    return None


def _params_only(tree: Any) -> bool:
    """Whether a checkpoint tree is `{"params": ...}` alone (an `lm quantize` checkpoint)."""
    names = list(_shapes(tree))
    return bool(names) and all(n.startswith("params.") for n in names)


def quantized_mismatch(saved: Any, expected: Any) -> str | None:
    """The rest of a one-line error when a weight-quantized (params-only) checkpoint meets code
    that wants a train state, or the reverse; None otherwise."""
    saved_q, want_q = _params_only(saved), _params_only(expected)
    if saved_q and not want_q:
        return (
            "is a weight-quantized inference checkpoint (`lm quantize`: int weights + scales, "
            "no optimizer state); it cannot be trained, resumed or read with "
            "model.weight_bits=0: sample or evaluate it with the config.json `lm quantize` "
            "wrote beside it, and train from the original run in a new --workdir"
        )
    if want_q and not saved_q:
        return (
            "is a full-precision training checkpoint but the config has model.weight_bits > 0; "
            "make a quantized copy with `lm quantize --workdir=RUN --out=NEW`"
        )
    return None
