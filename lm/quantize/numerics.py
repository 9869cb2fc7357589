"""Symmetric absmax quantization of a weight along its contraction axis, and its inverse.

Why absmax and symmetric: weights are centred on zero, so a zero point buys nothing, and the
largest weight of each channel (or group) is kept exactly, which bounds the rounding error of
every element by half a step: |w - q * scale| <= scale / 2 = absmax / (2 * qmax).

One layout covers both granularities. `w` has a contraction axis of size n; with
`group_size` g (0: g = n, one scale per output channel) the axis is cut into n / g groups and
`scale` has w's shape with that axis of size n / g. The integers keep w's shape: int8, or int4
(jnp.int4; saved from host numpy arrays, as `lm quantize` does, orbax stores it at 4 bits an
element, so no manual packing is needed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.errors import ConfigError

BITS = (8, 4)


def qmax(bits: int) -> int:
    """Largest integer magnitude used: 127 for int8, 7 for int4 (symmetric, -qmax..qmax)."""
    if bits not in BITS:
        raise ConfigError(f"weight quantization bits must be 8 or 4, got {bits}")
    return 2 ** (bits - 1) - 1


def int_dtype(bits: int) -> jnp.dtype:
    qmax(bits)
    return jnp.dtype(jnp.int8 if bits == 8 else jnp.int4)


def group_count(n: int, group_size: int) -> int:
    """Scales along a contraction axis of size n: 1 (per channel) or n / group_size."""
    if group_size <= 0 or group_size >= n:
        return 1
    if n % group_size:
        raise ConfigError(
            f"model.weight_group_size={group_size} does not divide a contraction axis of size "
            f"{n}; pick a divisor of every d_model / d_ff / heads*head_dim size (or 0)"
        )
    return n // group_size


def _grouped(x: jax.Array, axis: int, groups: int) -> jax.Array:
    """x with `axis` (size n) split into [groups, n / groups]."""
    axis = axis % x.ndim
    shape = x.shape
    return x.reshape(*shape[:axis], groups, shape[axis] // groups, *shape[axis + 1 :])


def quantize(
    w: jax.Array, axis: int, bits: int, group_size: int = 0
) -> tuple[jax.Array, jax.Array]:
    """w (float, contraction axis `axis` of size n) -> (q: w's shape, int8/int4;
    scale: float32, w's shape with `axis` of size n / group_size, or 1 per channel)."""
    top = qmax(bits)
    axis = axis % w.ndim
    groups = group_count(w.shape[axis], group_size)
    g = _grouped(w.astype(jnp.float32), axis, groups)  # [..., groups, n / groups, ...]
    absmax = jnp.max(jnp.abs(g), axis=axis + 1, keepdims=True)
    scale = absmax / top
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero channel stays exactly zero
    q = jnp.clip(jnp.round(g / safe), -top, top).astype(int_dtype(bits))
    return q.reshape(w.shape), jnp.squeeze(scale, axis + 1)


def dequantize(q: jax.Array, scale: jax.Array, axis: int, dtype=jnp.float32) -> jax.Array:
    """Inverse of `quantize`: q * scale, each scale broadcast over its group; q's shape."""
    axis = axis % q.ndim
    groups = scale.shape[axis]
    w = _grouped(q.astype(jnp.float32), axis, groups) * jnp.expand_dims(scale, axis + 1)
    return w.reshape(q.shape).astype(dtype)
