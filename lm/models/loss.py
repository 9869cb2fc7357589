"""Token cross-entropy, optionally over sequence chunks so full logits never exist at once.

The float32 `[batch, seq, vocab]` logits are the largest activation of a small model with a big
vocabulary (GPT-2 small at batch 8 x 1024: 1.6 GB). `chunked_cross_entropy` scans over chunks of
`chunk` positions, computing each chunk's logits from the final hidden states and the output
matrix, reducing them to a summed loss, and (through `jax.checkpoint`) recomputing them in the
backward pass instead of saving them: peak logits memory is `batch * chunk * vocab * 4` bytes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.models.layers.masks import soft_cap
from lm.sharding import constrain


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy (nats) of float32 logits [..., vocab] against int targets."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def chunked_cross_entropy(
    hidden: jax.Array,
    matrix: jax.Array,
    layout: str,
    targets: jax.Array,
    weights: jax.Array,
    chunk: int,
    softcap: float = 0.0,
) -> jax.Array:
    """Summed weighted cross-entropy of `hidden @ head` without materializing all logits.

    hidden [batch, seq, embed]; matrix [vocab, embed] (layout "ve", a tied embedding table) or
    [embed, vocab] ("ev"); targets/weights [batch, seq]. The sequence is split into chunks of
    `chunk` positions (the last one padded with zero weight), so the batch axis, and its
    sharding, are kept in every chunk. `softcap` > 0 caps the logits, cap * tanh(x / cap),
    as `Transformer.logits` does (Gemma 2's final soft cap).
    """
    batch, seq, embed = hidden.shape
    n = -(-seq // chunk)
    pad = n * chunk - seq
    weights = weights.astype(jnp.float32)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))

    def chunks(x):  # [batch, n * chunk, ...] -> [n, batch, chunk, ...]
        return jnp.moveaxis(x.reshape(batch, n, chunk, *x.shape[2:]), 1, 0)

    if layout not in ("ev", "ve"):
        raise ValueError(f"layout must be ev or ve, got {layout!r}")
    equation = f"bte,{layout}->btv"

    @jax.checkpoint
    def chunk_loss(matrix, h, t, w):
        logits = jnp.einsum(equation, h, matrix, preferred_element_type=jnp.float32)
        logits = soft_cap(logits, softcap)
        logits = constrain(logits, ("batch", "seq", "vocab"))
        return jnp.sum(token_losses(logits, t) * w)

    def body(total, xs):
        return total + chunk_loss(matrix, *xs), None

    total, _ = jax.lax.scan(
        body, jnp.zeros((), jnp.float32), (chunks(hidden), chunks(targets), chunks(weights))
    )
    return total
