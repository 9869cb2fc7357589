"""The engine's two compiled steps over a KV cache of per-slot rows.

The cache is the model's own (`Transformer.init_cache(slots, max_len)`): one row per decode
slot, [slots, max_len, kv_heads, head_dim] per global layer and a ring buffer of the window's
length per local one, with the absolute position held in each entry. Why rows rather than paged
blocks: the shapes are static, so each step is one XLA program with no gather over a block
table (which TPUs and XLA:CPU run slowly and which needs a custom kernel to be fast); the cost
is memory for max_len tokens per slot whether used or not, which a serving config sizes with
`slots`.

Both take the params as their flat list of arrays and the tree structure as a static argument:
jit's fast path then skips flattening an nnx.State on every call, which for a small model cost
more than the step itself.

- `prefill`: one chunk of one request's prompt [1, bucket] at positions start..., written into
  its slot's row; samples the request's first token from the last real position and, when
  asked, scores every prompt token given its prefix (echo / prompt logprobs).
- `decode`: a block of tokens for every slot at once, each slot at its own position; idle slots
  and slots still prefilling go in as padding (segment 0), which the cache write leaves
  untouched. Attention reads only the cache prefix the longest active sequence needs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lm.inference.sampling import choose_tokens, token_logprobs


def bucket_length(n: int, max_len: int, minimum: int = 16) -> int:
    """The padded length of n tokens: the next power of two (at least `minimum`), at most
    max_len; one compile per bucket rather than per length (prefill, decode, scoring)."""
    return min(max(minimum, 1 << max(n - 1, 0).bit_length()), max_len)


class Static:
    """A jit static argument hashed and compared by identity. Used for the model's graphdef:
    nnx's structural hash walks the whole graph, ~1 ms on every call of a step."""

    def __init__(self, value):
        self.value = value


def _row(cache, slot: jax.Array, axis: int):
    return jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, slot, 1, axis=axis), cache)


def _put_row(cache, row, slot: jax.Array, axis: int):
    return jax.tree.map(
        lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, axis=axis), cache, row
    )


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "param_tree", "batch_axis", "with_prompt_logprobs", "with_top"),
    donate_argnames=("cache",),
)
def prefill(
    graphdef: Static,
    params: list[jax.Array],
    cache,
    slot: jax.Array,
    tokens: jax.Array,
    next_tokens: jax.Array,
    start: jax.Array,
    length: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    param_tree,
    batch_axis: int,
    with_prompt_logprobs: bool,
    with_top: bool,
):
    """tokens [1, bucket] (right-padded, `length` real) at positions start..start+bucket-1 of
    slot `slot`; `next_tokens` [bucket] is the prompt token after each position (for prompt
    logprobs). A chunk at start 0 first empties the row (a reused slot holds an old request).

    Returns (cache, first token [1], its logprob [1], top (values, ids) [1, k] or None,
    prompt logprobs [bucket] or None, prompt top (values, ids) [bucket, k] or None)."""
    model = nnx.merge(graphdef.value, jax.tree.unflatten(param_tree, params))
    row = _row(cache, slot, batch_axis)

    def emptied(layer):
        return dict(layer, pos=jnp.where(start == 0, -1, layer["pos"]))

    row = [emptied(layer) for layer in row] if isinstance(row, list) else emptied(row)
    bucket = tokens.shape[1]
    positions = (start + jnp.arange(bucket, dtype=jnp.int32))[None]
    segments = (jnp.arange(bucket) < length).astype(jnp.int32)[None]
    logits, row = model(tokens, positions, segments, row, start)
    cache = _put_row(cache, row, slot, batch_axis)
    last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, axis=0, keepdims=True)
    token = choose_tokens(last, key[None], temperature[None], top_k[None], top_p[None])
    chosen, top_v, top_i = token_logprobs(last, token, with_top)
    prompt_lp = prompt_top = None
    if with_prompt_logprobs:
        prompt_lp, values, ids = token_logprobs(logits[0], next_tokens, with_top)
        prompt_top = (values, ids) if with_top else None
    top = (top_v, top_i) if with_top else None
    return cache, token, chosen, top, prompt_lp, prompt_top


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "param_tree", "with_top", "num_steps", "attend_len", "slot_axis"),
    donate_argnames=("cache",),
)
def decode(
    graphdef: Static,
    params: list[jax.Array],
    cache,
    tokens: jax.Array,
    index: jax.Array,
    active: jax.Array,
    keys: jax.Array,
    counts: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    *,
    param_tree,
    with_top: bool,
    num_steps: int,
    attend_len: int,
    slot_axis: int,
):
    """`num_steps` tokens for every slot in one call (a scan: the host's per-call work is paid
    once per block). tokens/index/active/... are [slots]: slot i's last token goes in at
    position index[i], and its next token is drawn with key fold_in(keys[i], counts[i]) (the
    request's own stream, whatever else is running).

    Only the first `attend_len` entries of the full-length layers' caches take part: the host
    picks the smallest bucket that holds every active slot's positions for the whole block, so
    a step reads what the longest sequence uses, not the whole context. A slot stops being fed
    when it reaches `attend_len` (its request has ended by then).

    Returns (cache, tokens [steps, slots], their logprobs [steps, slots], top (values, ids)
    [steps, slots, k] or None)."""
    full = max(x.shape[slot_axis] for x in jax.tree.leaves(cache))

    def view(x):
        if x.shape[slot_axis] != full or attend_len >= full:
            return x
        return jax.lax.slice_in_dim(x, 0, attend_len, axis=slot_axis)

    def one_step(carry, _):
        part, tokens, index, counts = carry
        # Variables rebuilt at this trace level (a layer scan inside refuses outer ones).
        model = nnx.merge(graphdef.value, jax.tree.unflatten(param_tree, params))
        live = active & (index < attend_len)
        position = jnp.where(live, index, 0)
        segments = live[:, None].astype(jnp.int32)
        logits, part = model(tokens[:, None], position[:, None], segments, part, position)
        logits = logits[:, 0]
        step_keys = jax.vmap(jax.random.fold_in)(keys, counts)
        token = choose_tokens(logits, step_keys, temperature, top_k, top_p)
        chosen, top_v, top_i = token_logprobs(logits, token, with_top)
        carry = (part, jnp.where(live, token, tokens), index + live, counts + live)
        return carry, (token, chosen) + ((top_v, top_i) if with_top else ())

    start = (jax.tree.map(view, cache), tokens, index, counts)
    (part, *_), outs = jax.lax.scan(one_step, start, None, length=num_steps)

    def put_back(x, v):
        if v.shape == x.shape:
            return v
        return jax.lax.dynamic_update_slice_in_dim(x, v, 0, axis=slot_axis)

    cache = jax.tree.map(put_back, cache, part)
    return cache, outs[0], outs[1], (outs[2], outs[3]) if with_top else None
