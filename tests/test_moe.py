"""Mixture of experts on one device: dispatch against a dense reference, capacity drops, the
router losses, gradients, parameter counts, and a short moe_tiny training run."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.config import get_config
from lm.models.layers import moe
from lm.models.layers.moe_dispatch import capacity, capacity_slots
from lm.models.transformer import ModelConfig

D, F, E, K = 16, 8, 4, 2


def layer_cfg(**overrides) -> ModelConfig:
    flags = {
        "d_model": D,
        "d_ff": 32,
        "num_heads": 2,
        "num_layers": 2,
        "mlp": "swiglu",
        "use_bias": False,
        "dtype": "float32",
        "num_experts": E,
        "experts_per_token": K,
        "moe_d_ff": F,
        "grouped_matmul": "ragged_dot",
        **overrides,
    }
    cfg = get_config("tiny", [f"--config.model.{k}={v}" for k, v in flags.items()])
    return ModelConfig.from_config(cfg.model, 64)


def make_layer(cfg, seed=0):
    layer = moe.MoE(cfg, rngs=nnx.Rngs(seed))
    # A larger init so the experts' outputs are far from zero (the test compares them).
    for name in ("gate", "up", "down"):
        p = getattr(layer, name)
        if p is not None:
            p[...] = p[...] * 10.0
    return layer


def tokens(b=3, s=8, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (b, s, D), jnp.float32)


def dense_reference(layer, x):
    """Every expert on every token, combined with the gates of the chosen experts (+ shared)."""
    cfg = layer.cfg
    logits = jnp.einsum("bsd,de->bse", x, layer.router.kernel[...])
    bias = None if layer.router_bias is None else layer.router_bias[...]
    experts, gates, _ = moe.route(
        logits, bias, cfg.experts_per_token, cfg.router, cfg.router_norm_topk
    )
    outs = []
    for e in range(cfg.num_experts):
        h = jax.nn.silu(x @ layer.gate[e]) * (x @ layer.up[e])
        outs.append(h @ layer.down[e])
    outs = jnp.stack(outs, axis=2)  # [b, s, E, d]
    weight = jnp.sum(jax.nn.one_hot(experts, cfg.num_experts) * gates[..., None], axis=2)
    y = jnp.einsum("bsed,bse->bsd", outs, weight)
    if layer.shared is not None:
        y = y + layer.shared(x)
    return y


@pytest.mark.parametrize(
    "router,shared,matmul",
    [
        ("softmax", 0, "ragged_dot"),
        ("softmax", 1, "tiled"),
        ("softmax", 0, "tokamax"),  # the GPU/TPU kernel's entry point, on its XLA reference path
        ("sigmoid", 2, "ragged_dot"),
    ],
)
def test_dropless_equals_a_dense_loop_over_experts(router, shared, matmul):
    cfg = layer_cfg(router=router, num_shared_experts=shared, grouped_matmul=matmul)
    layer = make_layer(cfg)
    if layer.router_bias is not None:  # the bias changes the choice, never the gates
        layer.router_bias[...] = jnp.array([0.3, -0.2, 0.0, 0.1])
    x = tokens()
    y, aux = layer(x)
    want = dense_reference(layer, x)
    assert float(jnp.max(jnp.abs(want))) > 0.1
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    assert float(aux["dropped_fraction"]) == 0.0


def test_capacity_with_room_for_all_equals_dropless():
    x = tokens()
    drop = make_layer(layer_cfg(moe_dispatch="dropless"))
    cap = make_layer(layer_cfg(moe_dispatch="capacity", capacity_factor=100.0))
    y_drop, _ = drop(x)
    y_cap, aux = cap(x)
    np.testing.assert_allclose(y_cap, y_drop, rtol=1e-5, atol=1e-6)
    assert float(aux["dropped_fraction"]) == 0.0


def hand_dropped(experts, cap):
    """Dropped assignments by the GShard order: all first choices, then second, per row."""
    b, s, k = experts.shape
    dropped = np.zeros(experts.shape, bool)
    for r in range(b):
        used = {}
        for c in range(k):
            for t in range(s):
                e = int(experts[r, t, c])
                used[e] = used.get(e, 0) + 1
                dropped[r, t, c] = used[e] > cap
    return dropped


def test_small_capacity_drops_the_hand_counted_assignments():
    cfg = layer_cfg(moe_dispatch="capacity", capacity_factor=0.5)
    layer = make_layer(cfg)
    x = tokens(b=4, s=16)
    y, aux = layer(x)
    logits = jnp.einsum("bsd,de->bse", x, layer.router.kernel[...])
    experts, gates, _ = moe.route(logits, None, K, "softmax", True)
    cap = capacity(16, K, E, 0.5)
    assert cap == 4
    dropped = hand_dropped(np.asarray(experts), cap)
    assert 0 < dropped.sum() < dropped.size
    np.testing.assert_allclose(float(aux["dropped_fraction"]), dropped.mean(), rtol=1e-6)
    slot, keep = capacity_slots(experts, E, cap)
    np.testing.assert_array_equal(np.asarray(keep), ~dropped)
    # A dropped assignment contributes nothing: the reference with its gate zeroed.
    kept_gates = jnp.where(jnp.asarray(dropped), 0.0, gates)
    outs = jnp.stack(
        [(jax.nn.silu(x @ layer.gate[e]) * (x @ layer.up[e])) @ layer.down[e] for e in range(E)],
        axis=2,
    )
    weight = jnp.sum(jax.nn.one_hot(experts, E) * kept_gates[..., None], axis=2)
    np.testing.assert_allclose(y, jnp.einsum("bsed,bse->bsd", outs, weight), rtol=1e-5, atol=1e-5)


def test_router_losses_match_the_formulas():
    logits = np.array(
        [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 3.0, -2.0], [1.0, 1.0, 0.9, -0.5]], np.float32
    )
    experts, _, probs = moe.route(jnp.asarray(logits), None, 2, "softmax", True)
    np.testing.assert_array_equal(np.asarray(experts), [[0, 1], [2, 1], [0, 1]])
    got = moe.router_losses(jnp.asarray(logits), probs, experts, 4)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    f = np.array([2, 3, 1, 0]) / 6.0  # assignments per expert / all assignments
    np.testing.assert_allclose(got["expert_load"], f, rtol=1e-6)
    np.testing.assert_allclose(got["load_balance_loss"], 4 * np.sum(f * p.mean(0)), rtol=1e-6)
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(got["router_z_loss"], np.mean(lse**2), rtol=1e-6)
    np.testing.assert_allclose(got["router_entropy"], np.mean(-(p * np.log(p)).sum(-1)), rtol=1e-5)
    # Uniform router: balance loss exactly 1.
    flat = moe.router_losses(jnp.zeros((4, 4)), jnp.full((4, 4), 0.25), jnp.arange(4)[:, None], 4)
    np.testing.assert_allclose(flat["load_balance_loss"], 1.0, rtol=1e-6)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_gradients_finite_and_zero_for_an_expert_without_tokens(dispatch):
    cfg = layer_cfg(router="sigmoid", moe_dispatch=dispatch, capacity_factor=2.0)
    layer = make_layer(cfg)
    layer.router_bias[...] = jnp.array([0.0, 0.0, -100.0, 0.0])  # expert 2 is never chosen
    graphdef, params = nnx.split(layer, nnx.Param)
    x = tokens()

    def loss(params):
        y, aux = nnx.merge(graphdef, params)(x)
        return jnp.sum(y**2) + aux["load_balance_loss"] + aux["router_z_loss"]

    grads = jax.grad(loss)(params)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(leaf))
    for name in ("gate", "up", "down"):
        g = np.asarray(grads[name][...])
        assert np.all(g[2] == 0.0), name
        assert all(np.any(g[e] != 0.0) for e in (0, 1, 3)), name
    assert np.any(np.asarray(grads["router"]["kernel"][...]) != 0.0)


@pytest.mark.slow  # ~35 s: make test-slow
def test_moe_tiny_trains_and_logs_the_expert_load(tmp_path):
    """A short in-process `lm train` of moe_tiny (shrunk): loss falls, expert load per step."""
    from lm.cli import main
    from tests.train_run import write_corpus

    corpus = write_corpus(tmp_path / "corpus.txt", paragraphs=200)
    workdir = str(tmp_path / "run")
    args = [
        "train",
        "--experiment=moe_tiny",
        f"--workdir={workdir}",
        "--config.data.source=text",
        f"--config.data.path={corpus}",
        "--config.tokenizer.kind=char",
        "--config.model.d_model=32",
        "--config.model.num_heads=2",
        "--config.model.moe_d_ff=32",
        "--config.data.seq_len=32",
        "--config.data.batch_size=8",
        "--config.train.steps=30",
        "--config.train.steps_per_call=1",
        "--config.train.log_every=5",
        "--config.train.eval_every=30",
        "--config.train.checkpoint_every=30",
        "--config.train.sample_prompts=",
        "--config.optim.warmup_steps=5",
    ]
    assert main(args) in (0, None)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    for r in train:
        load = r["moe/expert_load"]
        assert len(load) == 8 and abs(sum(load) - 1.0) < 1e-4
        for key in ("moe/load_balance_loss", "moe/router_z_loss", "moe/dropped_fraction"):
            assert np.isfinite(r[key])
    assert train[-1]["loss"] < train[0]["loss"] - 0.3
    # The report shows the last logged load as a bar chart next to the MoE scalars.
    with open(os.path.join(workdir, "report.md")) as f:
        report = f.read()
    assert "## Expert load" in report and "![expert load](expert_load.png)" in report
    with open(os.path.join(workdir, "expert_load.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_which_layers_are_moe_and_the_aux_averages_only_those():
    """moe_first_dense=1, moe_every=2 on 5 layers: layers 1 and 3 route, the rest are dense;
    the logged aux is the mean over the routed layers alone, and a layer scan is refused."""
    from lm.errors import ConfigError
    from lm.models.layers.mlp import MLP
    from lm.models.transformer import Transformer

    cfg = layer_cfg(num_layers=5, moe_first_dense=1, moe_every=2)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    kinds = [type(block.mlp) for block in model.blocks]
    assert kinds == [MLP, moe.MoE, MLP, moe.MoE, MLP]
    ids = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 64)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    _, _, layer_aux = model.hidden_and_aux(ids, pos, jnp.ones_like(ids))
    assert np.asarray(layer_aux["moe_layer"]).tolist() == [0, 1, 0, 1, 0]
    got = moe.reduce_layers(layer_aux)
    loads = np.asarray(layer_aux["expert_load"])
    np.testing.assert_allclose(got["expert_load"], (loads[1] + loads[3]) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(jnp.sum(got["expert_load"])), 1.0, rtol=1e-6)
    balance = np.asarray(layer_aux["load_balance_loss"])
    np.testing.assert_allclose(got["load_balance_loss"], (balance[1] + balance[3]) / 2, rtol=1e-6)
    with pytest.raises(ConfigError, match="scan_layers"):
        layer_cfg(num_layers=5, moe_first_dense=1, scan_layers=True)


def test_sigmoid_router_bias_moves_only_by_the_balance_rule():
    """DeepSeek-V3's aux-loss-free balancing: after one train step each layer's router_bias is
    exactly rate * sign(1/E - that layer's load) (computed here from the forward pass), so an
    overloaded expert's bias falls and an idle one's rises; the optimizer never moves it."""
    from lm import sharding
    from lm.models.transformer import Transformer
    from lm.training.train_step import Trainer
    from tests.test_moe_parallel import SMALL, VOCAB, batches

    flags = [*SMALL, "--config.model.router=sigmoid", "--config.model.router_bias_rate=0.01"]
    flags += ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.expert=1"]
    cfg = get_config("moe_tiny", flags)
    model_cfg = ModelConfig.from_config(cfg.model, VOCAB)
    trainer = Trainer(cfg, model_cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    state = trainer.init_state()
    batch = batches(1)[0]
    model = nnx.merge(trainer.graphdef, state.params)
    assert isinstance(model, Transformer)
    _, _, layer_aux = model.hidden_and_aux(
        batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    load = np.asarray(layer_aux["expert_load"])  # [layers, E]
    new_state, _ = trainer.train_step(state, trainer.device_batch(batch))
    for i in range(model_cfg.num_layers):
        got = np.asarray(new_state.params["blocks"][i]["mlp"]["router_bias"][...])
        want = 0.01 * np.sign(1.0 / model_cfg.num_experts - load[i])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
        assert (got != 0).any()
