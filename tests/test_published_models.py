"""Experiments named after papers: their parameter counts against the published numbers, the
architecture pieces each paper names, and `lm experiments --params` showing them."""

import jax
import numpy as np
import pytest
from flax import nnx

from lm.cli import main
from lm.config import get_config
from lm.models.transformer import ModelConfig, Transformer, experiment_param_counts
from lm.training import flops

# (experiment, total, active, rtol): the published counts and how precisely they were given.
# Exact counts are the sums of the released checkpoints' tensors (Mixtral, Mistral) or the
# paper's own table (Gemma 2: 2,024,517,888 non-embedding + 256,000 x 2,304 embedding for the
# released 256k vocabulary); DeepSeekMoE gives 16.4B and 2.8B to one decimal.
PUBLISHED = [
    ("mixtral_8x7b", 46_702_792_704, 12.9e9, 0),
    ("deepseek_moe_16b", 16.4e9, 2.8e9, 0.015),
    ("mistral_7b", 7_241_732_096, 7_241_732_096, 0),
    ("gemma2_2b", 2_024_517_888 + 256_000 * 2304, 2_024_517_888 + 256_000 * 2304, 0),
]


@pytest.mark.parametrize("name,total,active,rtol", PUBLISHED)
def test_param_counts_match_the_published_ones(name, total, active, rtol):
    cfg = get_config(name)
    got_total, got_active = experiment_param_counts(cfg)  # from the module's shapes
    if rtol:
        np.testing.assert_allclose(got_total, total, rtol=rtol)
        np.testing.assert_allclose(got_active, active, rtol=rtol)
    else:
        assert got_total == total
        # Mixtral's "12.9B active" is rounded; the dense models' active count is the total.
        np.testing.assert_allclose(got_active, active, rtol=0.005 if active != total else 0)
    # The FLOPs module's closed forms (used by MFU and `lm plan`) agree with the shapes.
    model_cfg = ModelConfig.from_config(cfg.model, cfg.model.vocab_size)
    assert flops.param_count(model_cfg) == got_total
    np.testing.assert_allclose(flops.active_param_count(model_cfg), got_active, rtol=1e-3)


def test_the_architectures_are_the_papers():
    mistral = ModelConfig.from_config(get_config("mistral_7b").model)
    assert all(mistral.is_local_layer(i) for i in range(32)) and mistral.sliding_window == 4096
    gemma = ModelConfig.from_config(get_config("gemma2_2b").model)
    assert [gemma.is_local_layer(i) for i in range(4)] == [True, False, True, False]
    assert (gemma.attn_logit_softcap, gemma.final_logit_softcap) == (50.0, 30.0)
    assert gemma.post_norms and gemma.embed_scale and gemma.mlp == "geglu"
    deepseek = ModelConfig.from_config(get_config("deepseek_moe_16b").model)
    assert [deepseek.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert deepseek.num_shared_experts == 2 and deepseek.experts_per_token == 6

    # Decoding Mistral at 32k keeps a 4096-slot ring per layer, not 32k (shapes only).
    model = nnx.eval_shape(lambda: Transformer(mistral, rngs=nnx.Rngs(0)))
    cache = jax.eval_shape(lambda: model.init_cache(1, 32768))
    assert cache["k"].shape == (32, 1, 4096, 8, 128)
    # Gemma's global layers keep the whole context, its local ones the window.
    gemma_model = nnx.eval_shape(lambda: Transformer(gemma, rngs=nnx.Rngs(0)))
    slots = [c["k"].shape[1] for c in jax.eval_shape(lambda: gemma_model.init_cache(1, 8192))]
    assert slots[:4] == [4096, 8192, 4096, 8192]


def test_experiments_params_lists_total_and_active(capsys):
    assert main(["experiments", "--params"]) == 0
    out = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "46702.79M params (12879.93M active)" in out["mixtral_8x7b"]
    assert "7241.73M params" in out["mistral_7b"] and "active" not in out["mistral_7b"]
    assert "2614.34M params" in out["gemma2_2b"]
    assert "active)" in out["deepseek_moe_16b"] and "active)" in out["moe_tiny"]


def test_gemma2_pieces_match_transformers():
    """A small Gemma 2 (the gemma2_2b experiment's pieces, tiny sizes) against transformers'
    Gemma2ForCausalLM with the same random weights: local/global alternation with a window
    shorter than the sequence, both soft caps set low enough to bite, sandwich norms, the
    embedding scale and the GeGLU MLP. Gemma's RMSNorm multiplies by (1 + weight)."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    vocab, d, f, layers, heads, kv, hd, window, seq = 300, 64, 128, 4, 4, 2, 16, 4, 12
    hf_cfg = Gemma2Config(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=f,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hd,
        sliding_window=window,
        query_pre_attn_scalar=hd,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = Gemma2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if name.endswith("norm.weight") else 0.08))
    w = {k: v.numpy() for k, v in hf.state_dict().items()}

    overrides = {
        "vocab_size": vocab,
        "num_layers": layers,
        "d_model": d,
        "num_heads": heads,
        "num_kv_heads": kv,
        "head_dim": hd,
        "d_ff": f,
        "max_seq_len": 64,
        "sliding_window": window,
        "attn_logit_softcap": 5.0,
        "final_logit_softcap": 3.0,
        "dtype": "float32",
        "remat": "none",
        "loss_chunk": 0,
    }
    cfg = get_config("gemma2_2b", [f"--config.model.{k}={v}" for k, v in overrides.items()])
    model = Transformer(ModelConfig.from_config(cfg.model), rngs=nnx.Rngs(0))
    model.embed.embedding[...] = w["model.embed_tokens.weight"]
    model.final_norm.scale[...] = 1 + w["model.norm.weight"]
    norms = {
        "attn_norm": "input_layernorm",
        "post_attn_norm": "post_attention_layernorm",
        "mlp_norm": "pre_feedforward_layernorm",
        "post_mlp_norm": "post_feedforward_layernorm",
    }
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        for ours, theirs in norms.items():
            getattr(block, ours).scale[...] = 1 + w[p + theirs + ".weight"]
        for name, n in (("q", heads), ("k", kv), ("v", kv)):
            kernel = w[p + f"self_attn.{name}_proj.weight"].T.reshape(d, n, hd)
            getattr(block.attn, name).kernel[...] = kernel
        block.attn.o.kernel[...] = w[p + "self_attn.o_proj.weight"].T.reshape(heads, hd, d)
        for name in ("gate", "up", "down"):
            getattr(block.mlp, name).kernel[...] = w[p + f"mlp.{name}_proj.weight"].T

    ids = np.random.default_rng(0).integers(0, vocab, (2, seq))
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    positions = np.broadcast_to(np.arange(seq), ids.shape)
    got, _ = model(ids, positions, np.ones_like(ids))
    assert np.abs(want).max() > 1.0  # the final cap (3) is what bounds them
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
