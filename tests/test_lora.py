"""LoRA / QLoRA adapters (lm/finetune/lora.py, Dense.add_lora): exactness, merging, training
only the adapters, dropout through the context key, and the pattern's errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from lm import sharding
from lm.config import get_config
from lm.errors import ConfigError
from lm.finetune import lora
from lm.models.layers.linear import Dense
from lm.models.transformer import ModelConfig, Transformer
from lm.quantize.weights import quantize_model

SCAN = ["--config.model.scan_layers=true"]
MOE = [
    "--config.model.num_experts=4",
    "--config.model.experts_per_token=2",
    "--config.model.moe_d_ff=16",
    "--config.model.mlp=swiglu",
]


def make(overrides=(), vocab=97):
    cfg = get_config("tiny", ["--config.model.d_model=32", "--config.model.d_ff=64", *overrides])
    mc = ModelConfig.from_config(cfg.model, vocab)
    return cfg, mc, Transformer(mc, rngs=nnx.Rngs(0))


def lora_cfg(cfg, rank=4, alpha=8.0, dropout=0.0, pattern=None):
    out = ml_collections.ConfigDict(cfg.finetune.lora.to_dict())
    out.rank, out.alpha, out.dropout = rank, alpha, dropout
    if pattern is not None:
        out.pattern = pattern
    return out


def inputs(batch=2, seq=12, vocab=97, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    return tokens, positions, jnp.ones((batch, seq), jnp.int32)


def randomize_b(model, std=0.05, seed=0):
    """Non-zero B everywhere, so the adapters change the output (numpy: no per-shape compile)."""
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if lora.has_lora(m):
            noise = rng.normal(size=m.lora_b.get_value().shape)
            m.lora_b.set_value(jnp.asarray(std * noise, jnp.float32))


# Compiled once per model structure: op-by-op eager forwards are several times slower.
_forward = jax.jit(
    lambda graphdef, state, args: nnx.merge(graphdef, state)(*args)[0], static_argnums=0
)


def logits(model, args):
    return np.asarray(_forward(*nnx.split(model), args))


def test_moe_adapts_attention_and_fresh_adapters_change_nothing():
    cfg, _, model = make(MOE)
    args = inputs()
    base = logits(model, args)
    paths = lora.add_lora(model, lora_cfg(cfg), nnx.Rngs(1))
    # The expert stacks are Params, not Dense: the default pattern adapts attention only.
    assert paths[:4] == [f"blocks/0/attn/{n}" for n in "koqv"]
    assert all("/attn/" in p for p in paths), paths
    np.testing.assert_allclose(logits(model, args), base, atol=1e-6)


@pytest.mark.parametrize("overrides", [[], SCAN], ids=["layers", "scan"])
def test_adapter_matches_by_hand_and_merge_is_exact(overrides):
    cfg, _, model = make(overrides)
    lc = lora_cfg(cfg)
    args = inputs()
    base = logits(model, args)
    paths = lora.add_lora(model, lc, nnx.Rngs(1))
    assert ("blocks/attn/q" if overrides else "blocks/1/mlp/down") in paths
    if overrides == SCAN:  # stacked like the kernel, so sharding sees a leading layers axis
        q = model.blocks.attn.q
        assert q.lora_a.get_value().shape == (q.kernel.get_value().shape[0], 32, lc.rank)
        assert sharding.param_axes(q.lora_a) == ("layers", None, None)
    np.testing.assert_allclose(logits(model, args), base, atol=1e-6)  # B = 0: no change
    randomize_b(model)
    adapted = logits(model, args)
    assert np.abs(adapted - base).max() > 1e-2  # B matters
    if overrides != SCAN:  # one Dense by hand: x W + (alpha / rank) (x A) B
        q = model.blocks[0].attn.q
        x = np.asarray(jax.random.normal(jax.random.key(5), (2, 3, 32)), np.float64)
        w = np.asarray(q.kernel.get_value(), np.float64).reshape(32, -1)
        a, b = (np.asarray(v.get_value(), np.float64) for v in (q.lora_a, q.lora_b))
        want = (x @ w + lc.alpha / lc.rank * (x @ a) @ b).reshape(2, 3, *q.out_shape)
        np.testing.assert_allclose(np.asarray(q(jnp.asarray(x, jnp.float32))), want, atol=1e-5)
    graphdef, lora_state, base_state = lora.split_lora(model)
    plain_graphdef, params = lora.merged_params(graphdef, lora_state, base_state)
    merged = nnx.merge(plain_graphdef, params)
    np.testing.assert_allclose(logits(merged, args), adapted, atol=1e-5)
    assert not any(lora.has_lora(m) for _, m in nnx.iter_modules(merged))
    # The merged model is a plain model again: the same program as one never adapted.
    fresh_graphdef, fresh = nnx.split(make(overrides)[2], nnx.Param)

    def program(g, p):
        return str(jax.make_jaxpr(lambda p: nnx.merge(g, p)(*args)[0])(p))

    assert program(plain_graphdef, params) == program(fresh_graphdef, fresh)


def ce_loss(model, args):
    out = model(*args)[0]
    return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], args[0][:, 1:]).mean()


def train_adapters(model, args, steps=5, lr=1e-2):
    """Adam on the adapters only; returns (losses, opt_state, lora_state, graphdef, base)."""
    graphdef, lora_state, base_state = lora.split_lora(model)
    tx = optax.adam(lr)
    opt_state = tx.init(lora_state)

    @jax.jit
    def step(lora_state, opt_state):
        def loss_fn(lora_state):
            return ce_loss(nnx.merge(graphdef, lora_state, base_state), args)

        loss, grads = jax.value_and_grad(loss_fn)(lora_state)
        updates, opt_state = tx.update(grads, opt_state, lora_state)
        return optax.apply_updates(lora_state, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        lora_state, opt_state, loss = step(lora_state, opt_state)
        losses.append(float(loss))
    return losses, opt_state, lora_state, graphdef, base_state


def test_only_adapters_train_and_their_count_is_the_formula():
    cfg, mc, model = make()
    rank = 4
    lora.add_lora(model, lora_cfg(cfg, rank=rank), nnx.Rngs(1))
    before = jax.tree.map(np.array, lora.split_lora(model)[2])
    losses, opt_state, lora_state, graphdef, base_state = train_adapters(model, inputs())
    d, f, hd = mc.d_model, mc.d_ff, mc.head_dim
    q_out, kv_out = mc.num_heads * hd, mc.num_kv_heads * hd
    per_layer = 2 * (d + q_out) + 2 * (d + kv_out) + 2 * (d + f)  # q o, k v, up down
    want = rank * per_layer * mc.num_layers
    count = lora.lora_param_count(lora_state)
    total = count + lora.lora_param_count(base_state)
    print(f"trainable {count} of {total} params ({100 * count / total:.2f}%)")
    assert count == want
    # Adam's mu and nu over the adapters only (plus its step count).
    assert lora.lora_param_count(opt_state) == 2 * count + 1
    assert losses[-1] < losses[0] - 0.05, losses
    trained = nnx.merge(graphdef, lora_state, base_state)
    after = lora.split_lora(trained)[2]
    jax.tree.map(np.testing.assert_array_equal, after, before)


def test_qlora_trains_int8_base_and_merges():
    cfg, _, float_model = make()
    model = quantize_model(float_model, 8, 0)
    paths = lora.add_lora(model, lora_cfg(cfg, rank=4), nnx.Rngs(1))
    q = model.blocks[0].attn.q
    kernel = np.asarray(q.kernel.get_value())
    assert kernel.dtype == np.int8 and q.lora_a.get_value().dtype == jnp.float32
    args = inputs()
    losses, _, lora_state, graphdef, base_state = train_adapters(model, args, lr=2e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    trained = nnx.merge(graphdef, lora_state, base_state)
    np.testing.assert_array_equal(trained.blocks[0].attn.q.kernel.get_value(), kernel)
    adapted = logits(trained, args)
    plain_graphdef, params = lora.merged_params(graphdef, lora_state, base_state)
    merged = nnx.merge(plain_graphdef, params)
    assert merged.blocks[0].attn.q.kernel.get_value().dtype == jnp.float32  # left float
    assert merged.blocks[0].attn.q.scale is None
    np.testing.assert_allclose(logits(merged, args), adapted, atol=1e-4)
    requant = nnx.merge(*lora.merged_params(graphdef, lora_state, base_state, requantize=True))
    assert requant.blocks[0].attn.q.kernel.get_value().dtype == jnp.int8
    np.testing.assert_allclose(logits(requant, args), adapted, atol=0.1)
    assert lora.adapter_metadata(lora_cfg(cfg, rank=4), paths)["paths"] == paths


def test_dropout_needs_the_context_key_and_differs_per_module():
    n = 16
    modules = nnx.List([Dense((n,), (n,), ("embed", "mlp"), rngs=nnx.Rngs(0)) for _ in range(2)])
    cfg = get_config("tiny", [])
    lora.add_lora(modules, lora_cfg(cfg, rank=n, alpha=n, dropout=0.5, pattern=r"\d"), nnx.Rngs(1))
    for m in modules:  # A = B = I and scale 1: the update is the dropped-out input itself
        m.lora_a.set_value(jnp.eye(n))
        m.lora_b.set_value(jnp.eye(n))
    rows = jnp.ones((8, n))
    np.testing.assert_array_equal(modules[0].lora_delta(rows), rows)  # no key: no dropout

    @jax.jit
    def deltas(key):
        with lora.lora_dropout_key(key):
            return [m.lora_delta(rows) for m in modules]

    d0, d1 = (np.asarray(d) for d in deltas(jax.random.key(0)))
    assert set(np.unique(d0)) == {0.0, 2.0} and not np.array_equal(d0, d1)

    # Through a whole model, under jit: a key changes the logits, no key does not.
    cfg, _, model = make()
    lora.add_lora(model, lora_cfg(cfg, dropout=0.3), nnx.Rngs(1))
    randomize_b(model)
    args = inputs()
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, key):
        with lora.lora_dropout_key(key):
            return nnx.merge(graphdef, state)(*args)[0]

    plain = np.asarray(forward(state, None))
    assert np.abs(np.asarray(forward(state, jax.random.key(0))) - plain).max() > 1e-4


def test_bad_lora_settings_are_config_errors():
    cfg, _, model = make()
    with pytest.raises(ConfigError, match="matches no Dense module.*blocks/0/attn/k"):
        lora.add_lora(model, lora_cfg(cfg, pattern="attn/q"), nnx.Rngs(1))  # not a fullmatch
    with pytest.raises(ConfigError, match="rank"):
        lora.add_lora(model, lora_cfg(cfg, rank=0), nnx.Rngs(1))
    with pytest.raises(ConfigError, match="not a regex"):
        lora.add_lora(model, lora_cfg(cfg, pattern="("), nnx.Rngs(1))
