"""Feed-forward blocks: GELU (GPT-2), SwiGLU (Llama) and GeGLU (Gemma)."""

from __future__ import annotations

import jax
from flax import nnx

from lm.models.layers.linear import Dense
from lm.sharding import constrain


class MLP(nnx.Module):
    """`gelu`: down(gelu(up(x))); `swiglu`: down(silu(gate(x)) * up(x)); `geglu`:
    down(gelu(gate(x)) * up(x)). [batch, seq, embed]."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        if cfg.mlp not in ("gelu", "swiglu", "geglu"):
            raise ValueError(f"model.mlp must be gelu, swiglu or geglu, got {cfg.mlp!r}")
        d, f = cfg.d_model, cfg.d_ff
        common = dict(
            rngs=rngs, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        self.up = Dense((d,), (f,), ("embed", "mlp"), init_std=cfg.init_std, **common)
        self.gate = (
            Dense((d,), (f,), ("embed", "mlp"), init_std=cfg.init_std, **common)
            if cfg.mlp in ("swiglu", "geglu")
            else None
        )
        self.gated_act = jax.nn.gelu if cfg.mlp == "geglu" else jax.nn.silu
        out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
        self.down = Dense((f,), (d,), ("mlp", "embed"), init_std=out_std, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.up(x)
        h = jax.nn.gelu(h) if self.gate is None else self.gated_act(self.gate(x)) * h
        h = constrain(h, ("batch", "seq", "mlp"))
        return self.down(h)
