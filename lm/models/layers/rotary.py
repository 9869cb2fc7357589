"""Rotary position embedding (Su et al. 2021), applied per token position so packing works."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotates channel pairs (i, i + head_dim/2) of x by angle position * theta^(-2i/head_dim).

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] (restarting at 0 in each packed
    segment, so every document sees the positions it would see alone).
    """
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[:, :, None, None] * freq  # [batch, seq, 1, half]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
