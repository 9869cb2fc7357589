"""Autoregressive sampling with a KV cache: temperature, top-k and top-p, one jit per shape.

The prompt is right-padded to a power-of-two bucket and prefilled in one call; decoding then
overwrites the cache from the real prompt length on. The padding goes in with segment id 0,
which the cache does not store (a local layer's ring buffer would otherwise lose real prompt
tokens to it), and the causal mask (key position <= query position) keeps anything stale
from being attended to.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lm.models.transformer import ModelConfig
from lm.tokenizer.vocab import SentencePieceVocab


def filter_logits(logits: jax.Array, top_k: int, top_p: jax.Array) -> jax.Array:
    """Masks logits [batch, vocab] outside the top-k set and outside the top-p nucleus."""
    neg = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass of the tokens strictly more likely than it is below top_p.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, neg, logits)


def sample_token(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array
) -> jax.Array:
    """logits [batch, vocab] -> token ids [batch]; temperature <= 0 is greedy."""
    greedy = jnp.argmax(logits, axis=-1)
    scaled = filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature <= 0, greedy, sampled).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k"))
def generate(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt: jax.Array,
    prompt_len: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    *,
    max_new_tokens: int,
    top_k: int,
) -> jax.Array:
    """prompt [batch, bucket] (right-padded, `prompt_len` real) -> [batch, max_new_tokens]."""
    model = nnx.merge(graphdef, params)
    batch, bucket = prompt.shape
    cache = model.init_cache(batch, bucket + max_new_tokens)
    positions = jnp.broadcast_to(jnp.arange(bucket, dtype=jnp.int32), (batch, bucket))
    segments = (positions < prompt_len).astype(jnp.int32)  # 0: padding, not cached
    logits, cache = model(prompt, positions, segments, cache, jnp.int32(0))
    last = jax.lax.dynamic_index_in_dim(logits, prompt_len - 1, axis=1, keepdims=False)
    key, sub = jax.random.split(key)
    token = sample_token(last, sub, temperature, top_k, top_p)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(token)

    def body(i, carry):
        cache, token, key, out = carry
        index = prompt_len + i - 1
        pos = jnp.full((batch, 1), index, jnp.int32)
        logits, cache = model(token[:, None], pos, jnp.ones_like(pos), cache, index)
        key, sub = jax.random.split(key)
        token = sample_token(logits[:, 0], sub, temperature, top_k, top_p)
        return cache, token, key, out.at[:, i].set(token)

    _, _, _, out = jax.lax.fori_loop(1, max_new_tokens, body, (cache, token, key, out))
    return out


def _global_inputs(params: nnx.State, inputs: tuple) -> tuple:
    """On a pod, the same host values as replicated global arrays on the params' mesh (every
    process calls with the same prompt, so all hold the same values); else jax arrays."""
    if jax.process_count() == 1:
        return tuple(jnp.asarray(x) for x in inputs)
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    replicated = NamedSharding(mesh, PartitionSpec())
    out = []
    for x in inputs:
        x = np.asarray(x)
        out.append(jax.make_array_from_callback(x.shape, replicated, lambda i, x=x: x[i]))
    return tuple(out)


def _fetch(out: jax.Array) -> np.ndarray:
    """The whole output on this host (gathered from every process on a pod)."""
    if jax.process_count() == 1 or out.is_fully_addressable:
        return np.asarray(out)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(out, tiled=True))


def generate_text(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    model_cfg: ModelConfig,
    vocab: SentencePieceVocab,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples: int = 1,
) -> list[str]:
    """One completion per (prompt, sample); stops at EOS. Long prompts keep their last tokens.

    On a pod every process must call it with the same arguments (the params are sharded across
    processes); each gets every completion."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    max_new_tokens = min(max_new_tokens, model_cfg.max_seq_len - 1)
    texts = []
    for p_index, text in enumerate(prompts):
        room = model_cfg.max_seq_len - max_new_tokens  # >= 1
        # Training rows start every document with the vocabulary's start id (BOS; a Hugging
        # Face tokenizer without BOS starts them with EOS); so does every prompt.
        start = getattr(vocab, "start_id", vocab.bos_id)
        ids = ([start] if start is not None else []) + vocab.encode(text)
        if not ids:
            raise ValueError(f"prompt {p_index} is empty and the vocabulary has no BOS token")
        ids = ids[len(ids) - room :] if len(ids) > room else ids
        bucket = min(max(16, 1 << (len(ids) - 1).bit_length()), room)
        prompt = np.zeros((num_samples, bucket), np.int32)
        prompt[:, : len(ids)] = ids
        key = jax.random.fold_in(jax.random.PRNGKey(seed), p_index)
        inputs = (prompt, np.int32(len(ids)), key, np.float32(temperature), np.float32(top_p))
        out = generate(
            graphdef,
            params,
            *_global_inputs(params, inputs),
            max_new_tokens=max_new_tokens,
            top_k=top_k,
        )
        for row in _fetch(out).tolist():
            if vocab.eos_id in row:
                row = row[: row.index(vocab.eos_id)]
            texts.append(vocab.decode(row))
    return texts
