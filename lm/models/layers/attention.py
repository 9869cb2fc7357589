"""Self-attention with grouped-query heads, packed-segment masking and a KV cache.

Causal by default; a bidirectional variant (BERT-style masked LM) and a prefix-LM mask (T5-style
span corruption on a decoder-only model) share the same module.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lm.models.layers.linear import Dense
from lm.models.layers.rotary import apply_rotary
from lm.sharding import constrain

# One layer's cache: {"k": [batch, max_len, kv_heads, head_dim], "v": same}.
LayerCache = dict[str, jax.Array]


def segment_mask(
    segment_ids: jax.Array, causal: bool = True, prefix: jax.Array | None = None
) -> jax.Array:
    """[batch, seq] segment ids -> [batch, 1, seq, seq] mask of allowed (query, key) pairs.

    Packed rows hold several documents; a token attends only to tokens of its own document:
    earlier ones when `causal`, all of them when not (bidirectional, for masked LM). `prefix`
    [batch, seq] (1 on each segment's input part) makes a prefix-LM: positions inside the prefix
    also see each other in both directions. Padding (segment 0) attends to padding, so no row is
    fully masked.
    """
    allowed = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        seq = segment_ids.shape[1]
        visible = jnp.tril(jnp.ones((seq, seq), jnp.bool_))[None]
        if prefix is not None:
            both = (prefix[:, :, None] > 0) & (prefix[:, None, :] > 0)
            visible = visible | both
        allowed = allowed & visible
    return allowed[:, None]


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim), masked) v as plain 4-D einsums; the CPU path.

    q [batch, seq, heads, head_dim], k/v [batch, kv_seq, kv_heads, head_dim], mask broadcastable
    to [batch, 1, seq, kv_seq]. Same math as `jax.nn.dot_product_attention`'s XLA path (fp32
    logits and softmax, masked logits set to -0.7 * float32 max), laid out for XLA:CPU:
    - no grouped 5-D [batch, kv_heads, group, ...] layout, whose softmax reductions XLA:CPU runs
      several times slower;
    - the softmax is normalized after the second einsum: `(exp(l - max) v) / sum(exp(l - max))`
      divides the [batch, seq, heads, head_dim] output instead of the [batch, heads, seq, kv_seq]
      probabilities, which also shortens the backward pass; and q is scaled instead of the
      logits.
    Forward + backward of one char_tiny attention layer on a 2-core CPU: 2.6 ms with
    `jax.nn.dot_product_attention`, 1.8 ms with plain einsums, 1.3 ms like this (BENCHMARKS.md).
    A row is never fully masked (`segment_mask`), so the sum is >= 1.
    """
    group = q.shape[2] // k.shape[2]
    if group > 1:  # grouped-query: each K/V head serves `group` consecutive query heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
    # Softmax is shift-invariant, so the max needs no gradient.
    weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    total = jnp.sum(weights, axis=-1).transpose(0, 2, 1)[..., None]  # [batch, seq, heads, 1]
    out = jnp.einsum(
        "bnts,bsnh->btnh", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return (out / total).astype(v.dtype)


class Attention(nnx.Module):
    """Multi-head attention; `num_kv_heads < num_heads` shares each K/V head across a group."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        common = dict(rngs=rngs, use_bias=cfg.use_bias, dtype=cfg.dtype)
        self.q = Dense(
            (d,), (n, h), ("embed", "heads", "head_dim"), init_std=cfg.init_std, **common
        )
        self.k = Dense(
            (d,), (k, h), ("embed", "kv_heads", "head_dim"), init_std=cfg.init_std, **common
        )
        self.v = Dense(
            (d,), (k, h), ("embed", "kv_heads", "head_dim"), init_std=cfg.init_std, **common
        )
        # GPT-2's scaled init of residual projections: std / sqrt(2 * num_layers).
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.o = Dense((n, h), (d,), ("heads", "head_dim", "embed"), init_std=out_std, **common)
        self.rope_theta = cfg.rope_theta if cfg.position == "rope" else None
        self.causal = cfg.causal
        self.implementation = None if cfg.attention == "auto" else cfg.attention

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: LayerCache | None = None,
        cache_index: jax.Array | None = None,
        prefix: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x [batch, seq, embed] -> ([batch, seq, embed], updated cache or None).

        With a cache, the `seq` new tokens are written at `cache_index` and attend to every
        cached position at or before their own (prefill and one-token decode alike).
        `prefix` [batch, seq] marks bidirectional prefix positions (see `segment_mask`).
        """
        q = constrain(self.q(x), ("batch", "seq", "heads", "head_dim"))
        k = constrain(self.k(x), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(self.v(x), ("batch", "seq", "kv_heads", "head_dim"))
        if self.rope_theta is not None:
            q = apply_rotary(q, positions, self.rope_theta)
            k = apply_rotary(k, positions, self.rope_theta)
        if cache is None:
            mask = segment_mask(segment_ids, self.causal, prefix)
        else:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = {"k": k, "v": v}
            query_pos = cache_index + jnp.arange(x.shape[1])
            mask = (jnp.arange(k.shape[1])[None, :] <= query_pos[:, None])[None, None]
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if self.implementation is None and jax.default_backend() == "cpu":
            out = einsum_attention(q, k, v, mask)
        else:
            out = jax.nn.dot_product_attention(
                q, k, v, mask=mask, implementation=self.implementation
            )
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        return self.o(out), cache
