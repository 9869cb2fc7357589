"""Attention masks: packed segments, causal / prefix-LM, sliding windows, KV-cache slots.

Sliding window (Mistral, Gemma 2 local layers), as transformers' `sliding_window_overlay`
(`kv_idx > q_idx - sliding_window`) on top of the causal mask: a query at index i sees keys j
with j <= i and i - j < window, itself included. A window of 0 means global (no window).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def in_window(query: jax.Array, key: jax.Array, window) -> jax.Array:
    """Whether key index/position `key` is inside the sliding window of query `query`
    (broadcasting); `window` an int or a traced scalar, 0 (or less) meaning no window."""
    if isinstance(window, int):
        return (
            jnp.ones(jnp.broadcast_shapes(query.shape, key.shape), jnp.bool_)
            if (window <= 0)
            else (query - key < window)
        )
    return (window <= 0) | (query - key < window)


def segment_mask(
    segment_ids: jax.Array,
    causal: bool = True,
    prefix: jax.Array | None = None,
    window=0,
) -> jax.Array:
    """[batch, seq] segment ids -> [batch, 1, seq, seq] mask of allowed (query, key) pairs.

    Packed rows hold several documents; a token attends only to tokens of its own document:
    earlier ones when `causal`, all of them when not (bidirectional, for masked LM). `prefix`
    [batch, seq] (1 on each segment's input part) makes a prefix-LM: positions inside the prefix
    also see each other in both directions. `window` > 0 (int or traced scalar) further limits
    each query to keys less than `window` indices back (causal only). Padding (segment 0)
    attends to padding, so no row is fully masked (a token always sees itself).
    """
    allowed = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        seq = segment_ids.shape[1]
        visible = jnp.tril(jnp.ones((seq, seq), jnp.bool_))[None]
        if prefix is not None:
            both = (prefix[:, :, None] > 0) & (prefix[:, None, :] > 0)
            visible = visible | both
        idx = jnp.arange(seq)
        if not (isinstance(window, int) and window <= 0):
            visible = visible & in_window(idx[:, None], idx[None, :], window)[None]
        allowed = allowed & visible
    return allowed[:, None]


def cache_mask(query_pos: jax.Array, key_pos: jax.Array, window) -> jax.Array:
    """KV-cache mask [batch, 1, seq, slots] from query positions ([seq], or [batch, seq] when
    every row is at its own position) and the absolute position held in each key slot
    [batch, slots] (-1: empty, never attended)."""
    q = (query_pos[None] if query_pos.ndim == 1 else query_pos)[:, :, None]
    k = key_pos[:, None, :]
    return ((k >= 0) & (k <= q) & in_window(q, k, window))[:, None]


def soft_cap(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2 logit soft-capping); identity when cap <= 0."""
    if not cap or cap <= 0:
        return x
    return cap * jnp.tanh(x / cap)
