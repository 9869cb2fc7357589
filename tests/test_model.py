"""The transformer: shapes, packing isolation, KV cache, remat, GQA, parameter count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import get_config
from lm.models.transformer import ModelConfig, Transformer, param_count
from lm.training import flops

LLAMA = [
    "--config.model.position=rope",
    "--config.model.norm=rmsnorm",
    "--config.model.mlp=swiglu",
    "--config.model.num_kv_heads=2",
    "--config.model.use_bias=false",
    "--config.model.tie_embeddings=false",
]


def make(overrides=(), vocab=97):
    cfg = get_config("tiny", ["--config.model.d_model=32", "--config.model.d_ff=64", *overrides])
    mc = ModelConfig.from_config(cfg.model, vocab)
    return cfg, mc, Transformer(mc, rngs=nnx.Rngs(0))


def inputs(batch=2, seq=12, vocab=97, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    return tokens, positions, jnp.ones((batch, seq), jnp.int32)


@pytest.mark.parametrize("overrides", [[], LLAMA, [*LLAMA, "--config.model.scan_layers=true"]])
def test_forward_shape_and_param_count_formula(overrides):
    cfg, mc, model = make(overrides)
    logits, cache = model(*inputs())
    assert logits.shape == (2, 12, 97) and logits.dtype == jnp.float32 and cache is None
    resolved = cfg.model
    resolved.vocab_size = 97
    assert param_count(nnx.state(model, nnx.Param)) == flops.param_count(resolved)


def test_gqa_shares_kv_heads():
    _, mc, model = make(LLAMA)
    assert model.blocks[0].attn.q.kernel.shape == (32, 4, 8)
    assert model.blocks[0].attn.k.kernel.shape == (32, 2, 8)


@pytest.mark.parametrize("overrides", [[], LLAMA])
def test_packed_documents_do_not_see_each_other(overrides):
    """Changing document 1 of a packed row leaves document 2's logits unchanged."""
    _, _, model = make(overrides)
    tokens, _, _ = inputs(batch=1, seq=10)
    segments = jnp.asarray([[1] * 4 + [2] * 6], jnp.int32)
    positions = jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]], jnp.int32)
    logits_a, _ = model(tokens, positions, segments)
    logits_b, _ = model(tokens.at[0, :4].set(5), positions, segments)
    np.testing.assert_allclose(logits_a[0, 4:], logits_b[0, 4:], atol=1e-5)
    assert not np.allclose(logits_a[0, :4], logits_b[0, :4])
    # And document 2 alone, at positions 0..5, gives the same logits as inside the pack.
    alone, _ = model(tokens[:, 4:], positions[:, 4:], jnp.ones((1, 6), jnp.int32))
    np.testing.assert_allclose(alone[0], logits_a[0, 4:], atol=1e-5)


@pytest.mark.parametrize("overrides", [[], [*LLAMA, "--config.model.scan_layers=true"]])
def test_kv_cache_matches_full_forward(overrides):
    _, _, model = make(overrides)
    tokens, positions, segments = inputs(batch=2, seq=12)
    full, _ = model(tokens, positions, segments)
    cache = model.init_cache(2, 16)
    prefill, cache = model(tokens[:, :7], positions[:, :7], segments[:, :7], cache, jnp.int32(0))
    np.testing.assert_allclose(prefill, full[:, :7], atol=1e-5)
    for i in range(7, 12):
        step, cache = model(
            tokens[:, i : i + 1], positions[:, i : i + 1], segments[:, :1], cache, jnp.int32(i)
        )
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_gradients(remat):
    _, _, plain = make()
    _, _, rematted = make([f"--config.model.remat={remat}"])
    batch = inputs()

    def grads(model):
        graphdef, params = nnx.split(model, nnx.Param)

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p)(*batch)[0] ** 2)

        return jax.grad(loss)(params)

    for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(rematted))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bad_model_config_names_the_key():
    cfg = get_config("tiny", ["--config.model.num_kv_heads=3"])
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig.from_config(cfg.model, 97)


def _changes_at(model, tokens, positions, segments, flip: int, prefix=None) -> np.ndarray:
    """[seq] bool: which positions' logits change when the token at `flip` changes."""
    before, _ = model(tokens, positions, segments, prefix=prefix)
    after, _ = model(
        tokens.at[:, flip].set((tokens[:, flip] + 1) % 97), positions, segments, prefix=prefix
    )
    return np.asarray(jnp.abs(after - before).max(axis=(0, 2)) > 1e-6)


def test_attention_masks_causal_bidirectional_and_prefix():
    tokens, positions, segments = inputs(batch=1)
    _, _, causal = make()
    assert not _changes_at(causal, tokens, positions, segments, flip=6)[:6].any()
    _, _, bidirectional = make(["--config.model.causal=false"])
    changed = _changes_at(bidirectional, tokens, positions, segments, flip=6)
    assert changed.all()  # every position sees the flipped token
    segments = segments.at[:, 8:].set(2)  # ... but never across a document boundary
    assert not _changes_at(bidirectional, tokens, positions, segments, flip=6)[8:].any()
    # Prefix-LM: the first 5 positions see each other both ways; later ones stay causal.
    prefix = jnp.zeros((1, 12), jnp.int32).at[:, :5].set(1)
    _, _, prefix_lm = make()
    ones = jnp.ones((1, 12), jnp.int32)
    assert _changes_at(prefix_lm, tokens, positions, ones, flip=3, prefix=prefix)[:3].all()
    assert not _changes_at(prefix_lm, tokens, positions, ones, flip=7, prefix=prefix)[:7].any()


def test_cpu_einsum_attention_matches_dot_product_attention():
    """The CPU path (normalized after the second einsum) against jax.nn's XLA attention."""
    from lm.models.layers.attention import einsum_attention, segment_mask

    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 16, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 16, 2, 8)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.repeat([[1, 2, 0, 0], [1, 1, 1, 3]], 4, axis=1), jnp.int32)
    for mask in (segment_mask(segments, True), segment_mask(segments, False)):

        def loss(fn, q, k, v, mask=mask):
            return jnp.sum(jnp.sin(fn(q, k, v, mask)))

        def reference(q, k, v, mask):
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

        np.testing.assert_allclose(
            einsum_attention(q, k, v, mask), reference(q, k, v, mask), rtol=1e-5, atol=1e-5
        )
        ours = jax.grad(lambda *a: loss(einsum_attention, *a), argnums=(0, 1, 2))(q, k, v)
        theirs = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_param_dtype_is_honoured_and_compute_runs_in_dtype():
    for name, want in [("float32", jnp.float32), ("bfloat16", jnp.bfloat16)]:
        for extra in ([], LLAMA):
            _, _, model = make([*extra, f"--config.model.param_dtype={name}"])
            leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
            assert leaves and all(x.dtype == want for x in leaves), name
            tokens, positions, segments = inputs()
            logits, _ = model(tokens, positions, segments)
            assert logits.dtype == jnp.float32
            assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("overrides", [[], LLAMA])
def test_chunked_loss_and_grads_equal_unchunked(overrides):
    from lm.training.train_step import loss_sums

    tokens, positions, segments = inputs(seq=12)
    rng = np.random.default_rng(1)
    batch = dict(
        inputs=tokens,
        positions=positions,
        segment_ids=segments,
        targets=jnp.asarray(rng.integers(0, 97, tokens.shape), jnp.int32),
        weights=jnp.asarray(rng.random(tokens.shape) > 0.2, jnp.float32),
    )
    results = []
    for chunk in (0, 5, 4):  # 5 pads the last chunk of the 12 positions
        _, _, model = make([*overrides, f"--config.model.loss_chunk={chunk}"])
        graphdef, params = nnx.split(model, nnx.Param)
        fn = jax.value_and_grad(lambda p: loss_sums(graphdef, p, batch, None)[0])  # noqa: B023
        results.append(jax.jit(fn)(params))
    (ref, ref_grads), *others = results
    for loss, grads in others:
        np.testing.assert_allclose(loss, ref, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_attention_backend_choice():
    from lm.models.layers.attention import choose_attention

    bf16, f32 = jnp.bfloat16, jnp.float32

    def pick(config, backend, dtype=bf16, head_dim=64, seq_len=1024, **kw):
        return choose_attention(
            config, backend, dtype=dtype, head_dim=head_dim, seq_len=seq_len, **kw
        )[0]

    assert pick("auto", "cpu") == "einsum"
    assert pick("auto", "gpu") == "cudnn"
    assert pick("auto", "tpu") == "splash"
    assert pick("auto", "gpu", dtype=f32) == "xla"  # cuDNN flash is bf16/fp16 only
    assert pick("auto", "gpu", head_dim=256) == "xla"
    assert pick("auto", "gpu", decoding=True) == "xla"
    assert pick("auto", "gpu", prefix=True) == "cudnn"  # prefix goes in as a mask
    assert pick("auto", "tpu", seq_len=1000) == "xla"
    assert pick("auto", "tpu", prefix=True) == "xla"
    assert pick("auto", "tpu", decoding=True) == "xla"
    assert pick("cudnn", "cpu") == "xla" and pick("splash", "gpu") == "xla"
    assert pick("xla", "tpu") == "xla" and pick("einsum", "gpu") == "einsum"
    assert choose_attention("cudnn", "cpu", dtype=bf16, head_dim=64, seq_len=8)[1]
    with pytest.raises(ValueError):
        pick("flash", "gpu")
    _, mc, _ = make()
    with pytest.raises(Exception, match="model.attention"):
        make(["--config.model.attention=flash"])
    assert mc.attention == "auto"


def test_splash_attention_matches_einsum_in_interpret_mode():
    from lm.models.layers.attention import einsum_attention, segment_mask, splash_attention

    rng = np.random.default_rng(0)
    b, t, n, kv, h = 1, 256, 2, 1, 64
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, kv, h)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, kv, h)), jnp.float32)
    seg = jnp.asarray(np.repeat([[1, 2, 3, 0]], 64, axis=1), jnp.int32)  # packed + padding
    for causal in (True, False):
        want = einsum_attention(q, k, v, segment_mask(seg, causal))
        got = splash_attention(q, k, v, seg, causal, interpret=True)
        keep = np.asarray(seg > 0)[..., None, None]  # padding rows: any finite value will do
        np.testing.assert_allclose(np.where(keep, got, 0), np.where(keep, want, 0), atol=2e-5)


def test_experiment_param_counts_match_the_hand_formula():
    from lm.models.transformer import experiment_param_counts

    d, f, layers, ctx, vocab = 768, 3072, 12, 1024, 50304
    block = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    gpt2 = layers * block + vocab * d + ctx * d + 2 * d
    assert gpt2 == 124_475_904
    assert experiment_param_counts(get_config("gpt2_124m")) == (gpt2, gpt2)
    # Llama-3.2-1B as published: 1,235,814,400 parameters (tied 128256 x 2048 embedding).
    llama = 1_235_814_400
    assert experiment_param_counts(get_config("llama_1b")) == (llama, llama)
