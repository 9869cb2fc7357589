"""Self-attention with grouped-query heads, packed-segment masking and a KV cache.

Causal by default; a bidirectional variant (BERT-style masked LM) and a prefix-LM mask (T5-style
span corruption on a decoder-only model) share the same module.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx

from lm import sharding
from lm.models.layers.linear import Dense
from lm.models.layers.masks import cache_mask, segment_mask, soft_cap
from lm.models.layers.rotary import apply_rotary
from lm.sharding import constrain

log = logging.getLogger(__name__)

# model.attention values. auto: einsum on CPU, cudnn on GPU, splash on TPU, each falling back
# to xla (jax.nn.dot_product_attention's XLA path) where it cannot express the case.
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "einsum")
_DEFAULT = {"cpu": "einsum", "gpu": "cudnn", "tpu": "splash"}
_warned: set[str] = set()


def choose_attention(
    config: str,
    backend: str,
    *,
    dtype,
    head_dim: int,
    seq_len: int,
    decoding: bool = False,
    prefix: bool = False,
    traced_window: bool = False,
    softcap: bool = False,
) -> tuple[str, str]:
    """(implementation, reason for a fallback or "") for one attention call.

    `config` is model.attention; `backend` is jax.default_backend(). cuDNN flash attention
    needs a GPU, bf16/fp16 inputs and head_dim a multiple of 8 up to 128; splash attention
    needs a TPU, a sequence length that is a multiple of 128 and a mask it can build statically
    (causal, local or full, with segment ids: not the prefix-LM mask, not a KV cache, not a
    per-layer window traced through a layer scan). cuDNN has no attention-logit soft cap.
    Anything else runs on xla (or the einsum path, which is xla's math laid out for CPU).
    """
    if config not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"model.attention must be one of {ATTENTION_IMPLEMENTATIONS}: {config!r}")
    impl = _DEFAULT.get(backend, "xla") if config == "auto" else config
    reason = ""
    if impl == "cudnn":
        if backend != "gpu":
            reason = f"cudnn needs a GPU, backend is {backend}"
        elif jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            reason = f"cudnn needs bfloat16/float16, dtype is {jnp.dtype(dtype).name}"
        elif head_dim % 8 or head_dim > 128:
            reason = f"cudnn needs head_dim a multiple of 8 <= 128, got {head_dim}"
        elif decoding:
            reason = "cudnn is not used with a KV cache (decode)"
        elif softcap:
            reason = "cudnn has no attention logit soft cap"
        elif traced_window:
            reason = "cudnn needs a static sliding window (scan_layers with a mixed pattern)"
    elif impl == "splash":
        if backend != "tpu":
            reason = f"splash needs a TPU, backend is {backend}"
        elif seq_len % 128:
            reason = f"splash needs seq_len a multiple of 128, got {seq_len}"
        elif decoding or prefix:
            reason = "splash cannot express the KV-cache or prefix-LM mask"
        elif traced_window:
            reason = "splash needs a static sliding window (scan_layers with a mixed pattern)"
    if reason:
        return "xla", reason
    return impl, ""


def _fallback_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        log.warning("attention: %s; using xla instead", reason)


# One layer's cache: {"k": [batch, slots, kv_heads, head_dim], "v": same, "pos": [batch, slots]
# int32 absolute position held in each slot, -1 when empty}. A global layer has max_len slots
# (position p at slot p); a local layer's is a ring buffer of `sliding_window` slots (p % slots).
LayerCache = dict[str, jax.Array]


def einsum_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, softcap: float = 0.0
) -> jax.Array:
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
    A row is never fully masked (`segment_mask`), so the sum is >= 1. `softcap` > 0 caps the
    logits, cap * tanh(logits / cap), before the mask (Gemma 2).
    """
    group = q.shape[2] // k.shape[2]
    if group > 1:  # grouped-query: each K/V head serves `group` consecutive query heads
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    logits = soft_cap(logits, softcap)
    logits = jnp.where(mask, logits, -0.7 * jnp.finfo(jnp.float32).max)
    # Softmax is shift-invariant, so the max needs no gradient.
    weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    total = jnp.sum(weights, axis=-1).transpose(0, 2, 1)[..., None]  # [batch, seq, heads, 1]
    out = jnp.einsum(
        "bnts,bsnh->btnh", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return (out / total).astype(v.dtype)


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, causal: bool, window: int = 0
) -> jax.Array:
    """cuDNN flash attention. The causal part is cuDNN's own (`is_causal`, which lets it skip
    blocks), and so is a sliding window (`local_window_size` (window - 1, 0): key j visible from
    query i when i - j <= window - 1); the packed-segment part of `mask` goes in as a mask (cuDNN
    applies it as a bias)."""
    local = (window - 1, 0) if window > 0 and causal else None
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, local_window_size=local, implementation="cudnn"
    )


@functools.cache
def _splash_kernel(
    heads: int,
    seq: int,
    causal: bool,
    interpret: bool = False,
    window: int = 0,
    softcap: float = 0.0,
):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if causal and window > 0:  # q - (window - 1) <= k <= q
        one = sa.LocalMask((seq, seq), window_size=(window - 1, 0), offset=0)
    else:
        one = sa.CausalMask((seq, seq)) if causal else sa.FullMask((seq, seq))
    return sa.make_splash_mha(
        sa.MultiHeadMask([one] * heads),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
        attn_logits_soft_cap=softcap if softcap > 0 else None,
    )


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    causal: bool,
    interpret: bool = False,
    window: int = 0,
    softcap: float = 0.0,
) -> jax.Array:
    """TPU splash attention (Pallas) with packed-segment ids; q/k/v [batch, seq, heads, dim].
    `window` > 0: causal sliding window (LocalMask); `softcap` > 0: attention logit soft cap.

    The kernel is not auto-partitioned, so under a mesh it runs in a shard_map over the batch
    (and heads) shards of the activation-sharding rules. `interpret` runs the Pallas kernel in
    interpret mode (any backend; for tests)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    group = q.shape[2] // k.shape[2]
    if group > 1:
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)

    def local(q, k, v, seg):
        kernel = _splash_kernel(q.shape[2], q.shape[1], causal, interpret, window, softcap)
        qkv = [x.transpose(0, 2, 1, 3) for x in (q, k, v)]  # [batch, heads, seq, dim]
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(
            *qkv, seg
        )
        return out.transpose(0, 2, 1, 3)

    active = sharding.active_rules()
    if active is None:
        return local(q, k, v, segment_ids)
    mesh, rules = active
    spec = sharding.logical_to_spec(("batch", None, "heads", None), rules, q.shape, mesh)
    seg_spec = sharding.logical_to_spec(("batch", None), rules, segment_ids.shape, mesh)
    return jax.shard_map(
        local, mesh=mesh, in_specs=(spec, spec, spec, seg_spec), out_specs=spec, check_vma=False
    )(q, k, v, segment_ids)


def _ring_write(cache: LayerCache, k: jax.Array, v: jax.Array, pos: jax.Array) -> LayerCache:
    """Writes new k/v [batch, seq, ...] with absolute positions `pos` [batch, seq] (-1: padding,
    not written) into ring-buffer slots pos % slots; of several tokens for one slot (a prefill
    longer than the buffer) the latest wins."""
    slots = cache["k"].shape[1]
    t = jnp.arange(k.shape[1])
    hit = (pos[:, :, None] >= 0) & (pos[:, :, None] % slots == jnp.arange(slots))  # [b, seq, s]
    best = jnp.max(jnp.where(hit, t[None, :, None], -1), axis=1)  # [batch, slots]
    has, take = best >= 0, jnp.maximum(best, 0)
    out = {}
    for name, new in (("k", k), ("v", v)):
        picked = jnp.take_along_axis(new, take[:, :, None, None], axis=1)
        out[name] = jnp.where(has[:, :, None, None], picked.astype(cache[name].dtype), cache[name])
    out["pos"] = jnp.where(has, jnp.take_along_axis(pos, take, axis=1), cache["pos"])
    return out


def _slot_write(
    cache: LayerCache, k: jax.Array, v: jax.Array, pos: jax.Array, cache_index: jax.Array
) -> LayerCache:
    """Writes new k/v [batch, seq, ...] at slots cache_index... of a full-length cache.

    A scalar index writes every row at the same slots (padding included: its `pos` is -1). A
    per-row index [batch] writes each row at its own slot and leaves a row's old contents where
    the new token is padding (`pos` -1): continuous batching runs idle or still-prefilling slots
    through the decode step as padding, which must not disturb what they hold."""
    new = {"k": k.astype(cache["k"].dtype), "v": v.astype(cache["v"].dtype), "pos": pos}
    index = jnp.asarray(cache_index)
    if index.ndim == 0:
        return {
            name: jax.lax.dynamic_update_slice_in_dim(cache[name], new[name], index, axis=1)
            for name in ("k", "v", "pos")
        }

    def one_row(old: jax.Array, value: jax.Array, keep: jax.Array, i: jax.Array) -> jax.Array:
        held = jax.lax.dynamic_slice_in_dim(old, i, value.shape[0], axis=0)
        keep = keep.reshape(keep.shape + (1,) * (value.ndim - 1))
        return jax.lax.dynamic_update_slice_in_dim(old, jnp.where(keep, held, value), i, axis=0)

    padding = pos < 0  # [batch, seq]
    return {
        name: jax.vmap(one_row)(cache[name], new[name], padding, index)
        for name in ("k", "v", "pos")
    }


class Attention(nnx.Module):
    """Multi-head attention; `num_kv_heads < num_heads` shares each K/V head across a group.

    Layer `layer` attends within `cfg.sliding_window` where `cfg.is_local_layer(layer)`; under
    a layer scan with a mixed pattern the window comes in as a traced per-layer scalar instead.
    """

    def __init__(self, cfg, layer: int = 0, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        common = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        qkv_bias = cfg.use_bias or getattr(cfg, "qkv_bias", False)  # Qwen2: q/k/v only

        def dense(inputs, outputs, axes, std, bias=qkv_bias):
            return Dense(inputs, outputs, axes, init_std=std, use_bias=bias, **common)

        self.q = dense((d,), (n, h), ("embed", "heads", "head_dim"), cfg.init_std)
        self.k = dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        self.v = dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg.init_std)
        # GPT-2's scaled init of residual projections: std / sqrt(2 * num_layers).
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.o = dense((n, h), (d,), ("heads", "head_dim", "embed"), out_std, cfg.use_bias)
        self.rope_theta = cfg.rope_theta if cfg.position == "rope" else None
        self.causal = cfg.causal
        self.implementation = cfg.attention
        local = getattr(cfg, "is_local_layer", None)
        self.window = int(cfg.sliding_window) if local is not None and local(layer) else 0
        self.softcap = float(getattr(cfg, "attn_logit_softcap", 0.0) or 0.0)

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: LayerCache | None = None,
        cache_index: jax.Array | None = None,
        prefix: jax.Array | None = None,
        window: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        """x [batch, seq, embed] -> ([batch, seq, embed], updated cache or None).

        With a cache, the `seq` new tokens (positions cache_index...; those with segment id 0
        are padding: not stored) attend to every cached position at or before their own and
        inside the window (prefill and one-token decode alike). `prefix` [batch, seq] marks
        bidirectional prefix positions (see `segment_mask`). `window` (a traced scalar, 0:
        global) overrides the layer's own window (a layer scan over a mixed pattern).
        """
        win = self.window if window is None else window
        static_window = isinstance(win, int)
        q = constrain(self.q(x), ("batch", "seq", "heads", "head_dim"))
        k = constrain(self.k(x), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(self.v(x), ("batch", "seq", "kv_heads", "head_dim"))
        if self.rope_theta is not None:
            q = apply_rotary(q, positions, self.rope_theta)
            k = apply_rotary(k, positions, self.rope_theta)
        if cache is None:
            mask = segment_mask(segment_ids, self.causal, prefix, win if self.causal else 0)
        else:
            # cache_index: one start for the whole batch (a scalar), or one per row [batch]
            # (continuous batching: every decode slot is at its own position).
            first = jnp.asarray(cache_index)
            first = first[:, None] if first.ndim == 1 else first
            query_pos = first + jnp.arange(x.shape[1])  # [seq] or [batch, seq]
            new_pos = jnp.where(segment_ids > 0, query_pos, -1).astype(jnp.int32)
            if static_window and win > 0:  # ring buffer: attend to [old slots; new tokens]
                old_pos = jnp.where(cache["pos"] < first, cache["pos"], -1)
                key_pos = jnp.concatenate([old_pos, new_pos], axis=1)
                mask = cache_mask(query_pos, key_pos, win)
                new_cache = _ring_write(cache, k, v, new_pos)
                k = jnp.concatenate([cache["k"].astype(k.dtype), k], axis=1)
                v = jnp.concatenate([cache["v"].astype(v.dtype), v], axis=1)
                cache = new_cache
            else:  # full length: position p at slot p
                cache = _slot_write(cache, k, v, new_pos, cache_index)
                k, v = cache["k"], cache["v"]
                mask = cache_mask(query_pos, cache["pos"], win)
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        impl, reason = choose_attention(
            self.implementation,
            jax.default_backend(),
            dtype=q.dtype,
            head_dim=q.shape[-1],
            seq_len=q.shape[1],
            decoding=cache is not None,
            prefix=prefix is not None,
            traced_window=not static_window,
            softcap=self.softcap > 0,
        )
        if reason:
            _fallback_once(reason)
        if impl == "einsum" or (impl == "xla" and self.softcap > 0):  # xla has no soft cap
            out = einsum_attention(q, k, v, mask, self.softcap)
        elif impl == "cudnn":
            if prefix is None:  # causal-ness and window by cuDNN, packing by the mask
                seg = segment_mask(segment_ids, False)
                out = cudnn_attention(q, k, v, seg, self.causal, win if self.causal else 0)
            else:
                out = cudnn_attention(q, k, v, mask, False)
        elif impl == "splash":
            out = splash_attention(
                q, k, v, segment_ids, self.causal, window=win, softcap=self.softcap
            )
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        return self.o(out), cache
