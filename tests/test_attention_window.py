"""Sliding-window and local/global attention (issue 10): the window mask, what a token can see,
ring-buffer KV caches against the full forward pass, greedy sampling past the window, splash
attention's LocalMask and soft cap, and the attention-implementation fallbacks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import get_config
from lm.inference.sample import generate_text
from lm.models.layers.attention import (
    Attention,
    _ring_write,
    choose_attention,
    einsum_attention,
    splash_attention,
)
from lm.models.layers.masks import cache_mask, in_window, segment_mask
from lm.models.transformer import ModelConfig, Transformer

VOCAB = 97
WINDOW = 4
# Llama-style (RoPE, grouped-query: 4 query heads share 2 K/V heads), float32. init_std 0.2 so
# that one token's change moves the logits it can reach well above float32 noise.
BASE = [
    "--config.model.d_model=32",
    "--config.model.d_ff=64",
    "--config.model.num_heads=4",
    "--config.model.num_kv_heads=2",
    "--config.model.position=rope",
    "--config.model.norm=rmsnorm",
    "--config.model.mlp=swiglu",
    "--config.model.use_bias=false",
    "--config.model.init_std=0.2",
    "--config.model.max_seq_len=64",
    "--config.model.dtype=float32",
    f"--config.model.sliding_window={WINDOW}",
]


def make(pattern, layers=2, scan=False, extra=()):
    """(ModelConfig, Transformer). A layer-scan model gets the weights of the same model built
    as a list of layers, stacked (and is built abstractly: eager init under nnx.vmap is slow)."""
    overrides = [
        *BASE,
        f"--config.model.attention_pattern={pattern}",
        f"--config.model.num_layers={layers}",
        *extra,
    ]
    mc = ModelConfig.from_config(get_config("tiny", overrides).model, VOCAB)
    listed = Transformer(mc, rngs=nnx.Rngs(0))
    if not scan:
        return mc, listed
    mc = dataclasses.replace(mc, scan_layers=True)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(mc, rngs=nnx.Rngs(0))))
    weights = nnx.to_pure_dict(nnx.state(listed))
    blocks = [weights["blocks"][i] for i in range(layers)]
    weights["blocks"] = jax.tree.map(lambda *each: jnp.stack(each), *blocks)
    nnx.replace_by_pure_dict(state, weights)
    return mc, nnx.merge(graphdef, state)


def inputs(batch=2, seq=16, seed=0):
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    return tokens, positions, jnp.ones((batch, seq), jnp.int32)


@nnx.jit
def forward(model, tokens, positions, segments):
    """The full (no-cache) forward pass: logits [batch, seq, vocab]."""
    return model(tokens, positions, segments)[0]


@nnx.jit
def cached(model, tokens, positions, segments, cache, index):
    """One cached call (a prefill or a decode step) at cache index `index` (traced)."""
    return model(tokens, positions, segments, cache, index)


def moved_by(model, tokens, j):
    """Per position [seq], how far the logits move when token j of every row is replaced."""
    _, positions, segments = inputs(*tokens.shape)
    base = forward(model, tokens, positions, segments)
    other = forward(model, tokens.at[:, j].set((tokens[:, j] + 1) % VOCAB), positions, segments)
    return np.abs(np.asarray(other - base)).max(axis=(0, 2))


def assert_reach(moved, first, last):
    """Exactly positions first..last (inclusive) moved; a masked key contributes an exact 0."""
    inside = np.zeros(moved.shape, bool)
    inside[first : last + 1] = True
    assert (moved[inside] > 1e-4).all(), (first, last, moved)
    assert (moved[~inside] < 1e-6).all(), (first, last, moved)


# --- masks ---------------------------------------------------------------------------------


def test_segment_mask_window_hand_computed_with_packing():
    """Window 3 over two packed documents and a padding token: a query sees itself and the two
    keys before it, of its own document only (transformers' sliding_window_overlay on the
    causal mask: kv_idx <= q_idx and kv_idx > q_idx - window)."""
    segments = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 0]], jnp.int32)
    expected = [
        "10000000",
        "11000000",
        "11100000",
        "01110000",
        "00111000",
        "00000100",
        "00000110",
        "00000001",
    ]
    expected = np.asarray([[c == "1" for c in row] for row in expected])
    mask = segment_mask(segments, causal=True, window=3)
    assert mask.shape == (1, 1, 8, 8)
    np.testing.assert_array_equal(mask[0, 0], expected)
    # The same from a traced window (a layer scan over a mixed pattern).
    traced = jax.jit(lambda w: segment_mask(segments, causal=True, window=w))(jnp.int32(3))
    np.testing.assert_array_equal(traced[0, 0], expected)


@pytest.mark.parametrize("window", [0, 1, 2, 3, 5, 20])
def test_segment_mask_matches_transformers_formula(window):
    """For any window (0: global), the mask is same-document & causal & kv > q - window, with a
    static and with a traced window."""
    segments = np.asarray([[1] * 7 + [2] * 9 + [3] * 3 + [0] * 5], np.int32)
    q, kv = np.arange(24)[:, None], np.arange(24)[None, :]
    expected = (segments[0][:, None] == segments[0][None, :]) & (kv <= q)
    if window > 0:
        expected &= kv > q - window
    segments = jnp.asarray(segments)
    np.testing.assert_array_equal(segment_mask(segments, window=window)[0, 0], expected)
    traced = jax.jit(lambda w: segment_mask(segments, window=w))(jnp.int32(window))
    np.testing.assert_array_equal(traced[0, 0], expected)
    # in_window alone: j is inside i's window iff i - j < window.
    inside = in_window(jnp.asarray(q), jnp.asarray(kv), window)
    np.testing.assert_array_equal(inside, (q - kv < window) | (window <= 0))


def test_cache_mask_hand_computed():
    """Cache slots hold absolute positions (-1 empty, 8 a stale later position): a query sees a
    slot when it is filled, not after it, and within the window."""
    key_pos = jnp.asarray([[4, 5, 6, -1, 8]], jnp.int32)
    query_pos = jnp.asarray([6, 7], jnp.int32)
    np.testing.assert_array_equal(
        cache_mask(query_pos, key_pos, 3)[0, 0], [[1, 1, 1, 0, 0], [0, 1, 1, 0, 0]]
    )
    np.testing.assert_array_equal(
        cache_mask(query_pos, key_pos, 0)[0, 0], [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    )


def test_ring_write_keeps_the_latest_position_per_slot():
    """Positions 0..9 into 4 slots (a prefill longer than the buffer): slot s keeps the latest
    p with p % 4 == s; padding (-1) writes nothing; a later write goes to p % 4."""
    slots, seq = 4, 10
    cache = {
        "k": jnp.zeros((1, slots, 1, 1)),
        "v": jnp.zeros((1, slots, 1, 1)),
        "pos": jnp.full((1, slots), -1, jnp.int32),
    }
    pos = jnp.arange(seq, dtype=jnp.int32)[None]
    values = (pos + 100).astype(jnp.float32)[:, :, None, None]  # k holds 100 + its position
    ring_write = jax.jit(_ring_write)
    full = ring_write(cache, values, -values, pos)
    np.testing.assert_array_equal(full["pos"][0], [8, 9, 6, 7])
    np.testing.assert_array_equal(full["k"][0, :, 0, 0], [108, 109, 106, 107])
    np.testing.assert_array_equal(full["v"][0, :, 0, 0], [-108, -109, -106, -107])
    # Three real tokens then padding: the padding leaves slot 3 empty.
    padded = jnp.asarray([[0, 1, 2, -1, -1, -1]], jnp.int32)
    out = ring_write(cache, values[:, :6], values[:, :6], padded)
    np.testing.assert_array_equal(out["pos"][0], [0, 1, 2, -1])
    np.testing.assert_array_equal(out["k"][0, :, 0, 0], [100, 101, 102, 0])
    # One decode token at position 10 overwrites slot 2 (position 6) and nothing else.
    seven = jnp.full((1, 1, 1, 1), 7.0)
    out = ring_write(full, seven, seven, jnp.asarray([[10]], jnp.int32))
    np.testing.assert_array_equal(out["pos"][0], [8, 9, 10, 7])
    np.testing.assert_array_equal(out["k"][0, :, 0, 0], [108, 109, 7, 107])


# --- what a token sees ---------------------------------------------------------------------


@pytest.mark.parametrize("j", [0, 5, 11, 15])
def test_one_local_layer_sees_exactly_its_window(j):
    """One local layer (Mistral): token j reaches exactly positions j..j+window-1. So output i is
    unchanged when a token before i - window + 1 changes, and does change for the token at
    i - window + 1 (the window's oldest) as for every token inside it."""
    _, model = make("L", layers=1)
    tokens, _, _ = inputs(seq=16)
    assert_reach(moved_by(model, tokens, j), j, min(15, j + WINDOW - 1))


def test_stacked_local_layers_reach_layers_times_window():
    """Through 3 local layers a token reaches 3 * (window - 1) positions further, no more; with
    a global layer on top ("LLG") it reaches everything after it."""
    tokens, _, _ = inputs(seq=16)
    _, model = make("L", layers=3)
    assert_reach(moved_by(model, tokens, 2), 2, 2 + 3 * (WINDOW - 1))
    _, model = make("LLG", layers=3)
    assert_reach(moved_by(model, tokens, 2), 2, 15)


def test_scanned_mixed_pattern_equals_layer_list():
    """A layer scan over "LG" (the per-layer window traced through the scan: layer 0 local,
    layer 1 global) equals the same weights run as a list of layers."""
    tokens, positions, segments = inputs(seq=16)
    _, listed = make("LG")
    _, scanned = make("LG", scan=True)
    np.testing.assert_allclose(
        forward(scanned, tokens, positions, segments),
        forward(listed, tokens, positions, segments),
        atol=1e-5,
    )


@nnx.jit
def run_both(attn, x, positions, segments, window):
    """An Attention layer's output with its own (static) window and with `window` (traced)."""
    return attn(x, positions, segments)[0], attn(x, positions, segments, window=window)[0]


def test_xla_implementation_matches_einsum():
    """attention=xla (jax.nn.dot_product_attention with the window mask) equals einsum for a
    local layer, with the layer's static window and with a traced one (a scan's)."""
    mc, _ = make("L")
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, mc.d_model)), jnp.float32)
    _, positions, segments = inputs(seq=16)
    out = {}
    for impl in ("einsum", "xla"):
        attn = Attention(dataclasses.replace(mc, attention=impl), 0, rngs=nnx.Rngs(0))
        assert attn.window == WINDOW
        static, traced = run_both(attn, x, positions, segments, jnp.int32(WINDOW))
        np.testing.assert_allclose(traced, static, atol=1e-6)
        out[impl] = static
    np.testing.assert_allclose(out["xla"], out["einsum"], atol=1e-5)


# --- decoding with ring buffers ------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern,scan", [("L", False), ("LG", False), ("GL", False), ("L", True), ("LG", True)]
)
def test_ring_buffer_decode_matches_full_forward(pattern, scan):
    """Prefill a 12-token bucket holding 3 real tokens (fewer than the window), 6 (more), or
    12 (three times the ring buffer, no padding); the padding must not enter the cache. Then
    decode one token at a time to position 19: every prefill and decode logit equals the full
    forward pass over the whole sequence. A local layer's cache has `sliding_window` slots,
    a global one max_len; a scan over a mixed pattern keeps them all full length (the window
    masks, traced)."""
    mc, model = make(pattern, layers=2, scan=scan)
    seq, max_len, batch, bucket = 20, 24, 2, 12
    tokens, positions, segments = inputs(batch, seq)
    full = forward(model, tokens, positions, segments)
    cache = model.init_cache(batch, max_len)
    kv = (mc.num_kv_heads, mc.head_dim)
    if scan:
        slots = WINDOW if pattern == "L" else max_len
        assert cache["k"].shape == cache["v"].shape == (2, batch, slots, *kv)
        assert cache["pos"].shape == (2, batch, slots)
    else:
        for i, layer in enumerate(cache):
            slots = WINDOW if mc.is_local_layer(i) else max_len
            assert layer["k"].shape == layer["v"].shape == (batch, slots, *kv)
    for prompt in (3, 6, bucket):
        cache = model.init_cache(batch, max_len)
        real = (positions[:, :bucket] < prompt).astype(jnp.int32)  # 0: padding
        logits, cache = cached(
            model, tokens[:, :bucket], positions[:, :bucket], real, cache, jnp.int32(0)
        )
        np.testing.assert_allclose(logits[:, :prompt], full[:, :prompt], atol=1e-5)
        for i in range(prompt, seq):
            step = slice(i, i + 1)
            logits, cache = cached(
                model, tokens[:, step], positions[:, step], segments[:, step], cache, jnp.int32(i)
            )
            np.testing.assert_allclose(logits[:, 0], full[:, i], atol=1e-5, err_msg=f"pos {i}")


class _Ids:
    """A stand-in vocabulary: text is space-separated token ids."""

    bos_id, eos_id = 1, -1

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(str(t) for t in ids)


def test_greedy_generate_text_past_the_window_matches_full_forward_loop():
    """generate_text at temperature 0 on an all-local model: 5 prompt ids right-padded to a
    16-token bucket (11 padding tokens, more than the ring buffer holds, must not enter it),
    then 15 new tokens, far past the window; equals a greedy loop over the full forward pass."""
    mc, model = make("L", layers=2)
    graphdef, params = nnx.split(model)
    prompt = [int(t) for t in np.random.default_rng(3).integers(2, VOCAB, 4)]
    new = 15
    (text,) = generate_text(
        graphdef,
        params,
        mc,
        _Ids(),
        [" ".join(map(str, prompt))],
        max_new_tokens=new,
        temperature=0.0,
    )
    ids = [1, *prompt]
    total = len(ids) + new
    buffer = np.zeros((1, total), np.int32)  # causal: the zeros after position t do not matter
    buffer[0, : len(ids)] = ids
    _, positions, segments = inputs(1, total)
    for t in range(len(ids), total):
        logits = forward(model, jnp.asarray(buffer), positions, segments)
        buffer[0, t] = int(jnp.argmax(logits[0, t - 1]))
    expected = buffer[0, len(ids) :].tolist()
    assert len(set(expected)) > 3  # the continuation depends on its context
    assert [int(t) for t in text.split()] == expected


# --- splash (Pallas interpret mode) and the implementation choice -----------------------------


@pytest.mark.parametrize("window,softcap", [(5, 0.0), (5, 2.0), (0, 2.0)])
def test_splash_local_mask_and_softcap_match_einsum(window, softcap):
    """splash_attention's LocalMask (window - 1, 0) and logit soft cap, run in Pallas interpret
    mode over two 128-blocks (the window crosses the block boundary), with grouped-query heads
    and packed segments, equal einsum_attention with `segment_mask`'s window."""
    rng = np.random.default_rng(0)
    batch, seq, heads, kv_heads, dim = 1, 256, 2, 1, 8
    q = jnp.asarray(rng.normal(size=(batch, seq, heads, dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, dim)), jnp.float32)
    segments = jnp.asarray([[1] * 100 + [2] * 140 + [0] * 16], jnp.int32)
    out = splash_attention(q, k, v, segments, True, interpret=True, window=window, softcap=softcap)
    mask = segment_mask(segments, True, None, window)
    np.testing.assert_allclose(out, einsum_attention(q, k, v, mask, softcap), atol=1e-5)


def test_choose_attention_fallbacks():
    """cuDNN has no soft cap and neither cuDNN nor splash takes a traced window: those fall back
    to xla with a reason; a static window and splash's soft cap are kept."""
    gpu = dict(dtype=jnp.bfloat16, head_dim=64, seq_len=256)
    assert choose_attention("cudnn", "gpu", **gpu) == ("cudnn", "")
    impl, reason = choose_attention("cudnn", "gpu", **gpu, softcap=True)
    assert impl == "xla" and "soft cap" in reason
    impl, reason = choose_attention("auto", "gpu", **gpu, traced_window=True)
    assert impl == "xla" and "static sliding window" in reason
    assert choose_attention("splash", "tpu", **gpu, softcap=True) == ("splash", "")
    impl, reason = choose_attention("auto", "tpu", **gpu, traced_window=True)
    assert impl == "xla" and "static sliding window" in reason
    impl, reason = choose_attention("splash", "tpu", **gpu, decoding=True)
    assert impl == "xla" and "KV-cache" in reason
    assert choose_attention("auto", "cpu", **gpu, traced_window=True, softcap=True) == (
        "einsum",
        "",
    )
