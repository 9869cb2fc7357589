"""Next-token choice for a batch of decode slots, each with its own temperature, top-k, top-p
and random stream.

Every row is computed from its own logits and key only, so a request's tokens do not depend on
which other requests share the batch (a seeded sample is reproducible; greedy is argmax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TOP_LOGPROBS = 20  # the most alternatives a request may ask for (OpenAI's limit)


def filter_rows(
    logits: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Masks each row of logits [rows, vocab] outside its top-k set (`top_k` [rows], 0: off) and
    its top-p nucleus (`top_p` [rows]); returns (filtered logits, kept-token count [rows]).

    A token is kept while the probability mass of the tokens strictly more likely than it is
    below top_p, so the most likely token is always kept."""
    vocab = logits.shape[-1]
    neg = jnp.finfo(logits.dtype).min
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    kth_index = jnp.clip(top_k - 1, 0, vocab - 1)[:, None]
    kth = jnp.where(top_k[:, None] > 0, jnp.take_along_axis(ordered, kth_index, axis=1), neg)
    ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    filtered = jnp.where(logits < threshold, neg, logits)
    return filtered, jnp.sum(filtered > neg, axis=-1)


def choose_tokens(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """logits [rows, vocab], keys [rows, 2] (one PRNG key a row) -> token ids [rows].

    Rows with temperature <= 0 are greedy; when every row is, the sort behind top-k / top-p is
    skipped (`lax.cond`), which keeps greedy decoding as cheap as an argmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        filtered, _ = filter_rows(scaled, top_k, top_p)
        drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, filtered)
        return jnp.where(temperature <= 0, greedy, drawn.astype(jnp.int32))

    return jax.lax.cond(jnp.all(temperature <= 0), lambda _: greedy, sample, None)


def token_logprobs(
    logits: jax.Array, tokens: jax.Array, with_top: bool
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Log-probabilities under the model (before temperature, as the OpenAI API reports them):
    of `tokens` [rows] given logits [rows, vocab] -> [rows], and with `with_top` the
    TOP_LOGPROBS most likely alternatives' (values [rows, k], ids [rows, k])."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=1)[:, 0]
    if not with_top:
        return chosen, None, None
    values, ids = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logits.shape[-1]))
    return chosen, values, ids
