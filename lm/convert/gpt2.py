"""GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm with biases, tanh GELU, tied head.

GPT-2's projections are `Conv1D` modules whose weight is already `[in, out]`, so only reshapes
are needed: `c_attn` `[d, 3d]` fuses q, k and v along its output and is split into our three
`[d, heads, head_dim]` kernels (its bias `[3d]` likewise); `c_proj` `[d, d]` becomes
`o.kernel [heads, head_dim, d]`; the MLP's `c_fc [d, 4d]` / `c_proj [4d, d]` are our up / down
kernels as they are. `gelu_new` is the tanh approximation, which is `jax.nn.gelu`'s default
(approximate=True) in lm/models/layers/mlp.py. Checkpoints saved from the bare `GPT2Model`
(the original `gpt2` upload) name tensors without the `transformer.` prefix; the prefix found
is kept for export.
"""

from __future__ import annotations

import numpy as np

from lm.convert.common import Dim, Family, Link, contiguous, get_key, require_int, same
from lm.errors import ConfigError

_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class GPT2Family(Family):
    architecture = "GPT2LMHeadModel"
    model_type = "gpt2"

    def model_keys(self, hf: dict) -> dict:
        arch = self.architecture
        d = require_int(hf, "n_embd", arch)
        n = require_int(hf, "n_head", arch)
        act = hf.get("activation_function", "gelu_new")
        if act not in _TANH_GELU:
            raise ConfigError(
                f"config.json activation_function={act!r} is not supported for GPT-2 (lm's "
                f"MLP uses the tanh GELU: one of {', '.join(_TANH_GELU)})"
            )
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise ConfigError("config.json scale_attn_by_inverse_layer_idx=true is not supported")
        if hf.get("scale_attn_weights") is False:
            raise ConfigError("config.json scale_attn_weights=false is not supported")
        if d % n:
            raise ConfigError(f"config.json n_embd={d} must be a multiple of n_head={n}")
        return dict(
            vocab_size=require_int(hf, "vocab_size", arch),
            num_layers=require_int(hf, "n_layer", arch),
            d_model=d,
            num_heads=n,
            num_kv_heads=n,
            head_dim=d // n,
            d_ff=int(get_key(hf, "n_inner", default=4 * d)),
            max_seq_len=int(get_key(hf, "n_positions", "n_ctx", default=1024)),
            position="learned",
            norm="layernorm",
            norm_eps=float(get_key(hf, "layer_norm_epsilon", default=1e-5)),
            mlp="gelu",
            use_bias=True,
            qkv_bias=False,
            tie_embeddings=bool(get_key(hf, "tie_word_embeddings", default=True)),
            attention_pattern="G",
            sliding_window=0,
            init_std=float(get_key(hf, "initializer_range", default=0.02)),
            dropout=0.0,
        )

    def hf_config(self, mc, base: dict) -> dict:
        if mc.num_kv_heads != mc.num_heads or mc.head_dim * mc.num_heads != mc.d_model:
            raise ConfigError(
                "GPT-2 needs num_kv_heads == num_heads and head_dim * num_heads == d_model"
            )
        out = dict(base)
        out.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            vocab_size=mc.vocab_size,
            n_embd=mc.d_model,
            n_layer=mc.num_layers,
            n_head=mc.num_heads,
            n_inner=None if mc.d_ff == 4 * mc.d_model else mc.d_ff,
            n_positions=mc.max_seq_len,
            layer_norm_epsilon=mc.norm_eps,
            activation_function=base.get("activation_function", "gelu_new"),
            tie_word_embeddings=mc.tie_embeddings,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
        )
        if not base:  # our dropout is on the residual branches and the embeddings only
            out.update(resid_pdrop=mc.dropout, embd_pdrop=mc.dropout, attn_pdrop=0.0)
        return out

    def detect_format(self, names: set[str]) -> str:
        """ "bare": tensors named without the `transformer.` prefix (a saved bare GPT2Model);
        "": GPT2LMHeadModel's names."""
        return "bare" if "wte.weight" in names and "transformer.wte.weight" not in names else ""

    def ignorable(self, mc, name: str) -> bool:
        # attn.bias / attn.masked_bias: the causal-mask buffers older checkpoints saved.
        return (
            super().ignorable(mc, name)
            or name.endswith(".attn.bias")
            or name.endswith(".attn.masked_bias")
        )

    def links(self, mc, fmt: str = "") -> list[Link]:
        pre = "" if fmt == "bare" else "transformer."
        V, T = Dim(mc.vocab_size, "vocab_size"), Dim(mc.max_seq_len, "n_positions")
        D, F = Dim(mc.d_model, "n_embd"), Dim(mc.d_ff, "n_inner")
        n, h, d = mc.num_heads, mc.head_dim, mc.d_model
        out = [
            same("embed.embedding", pre + "wte.weight", (V, D)),
            same("pos_embed.embedding", pre + "wpe.weight", (T, D)),
        ]

        def split_qkv(w):  # [d, 3d] -> 3 x [d, n, h]
            return tuple(contiguous(x).reshape(d, n, h) for x in np.split(w, 3, axis=1))

        def join_qkv(q, k, v):
            return (contiguous(np.concatenate([x.reshape(d, -1) for x in (q, k, v)], axis=1)),)

        def split_qkv_bias(b):  # [3d] -> 3 x [n, h]
            return tuple(contiguous(x).reshape(n, h) for x in np.split(b, 3))

        def join_qkv_bias(q, k, v):
            return (contiguous(np.concatenate([x.reshape(-1) for x in (q, k, v)])),)

        fused = Dim(3 * d, "3*n_embd")
        for i in range(mc.num_layers):
            p, b = f"{pre}h.{i}.", f"blocks.{i}."
            qkv = tuple(f"{b}attn.{x}.kernel" for x in "qkv")
            qkv_b = tuple(f"{b}attn.{x}.bias" for x in "qkv")
            out += [
                same(b + "attn_norm.scale", p + "ln_1.weight", (D,)),
                same(b + "attn_norm.bias", p + "ln_1.bias", (D,)),
                Link(qkv, (p + "attn.c_attn.weight",), ((D, fused),), split_qkv, join_qkv),
                Link(qkv_b, (p + "attn.c_attn.bias",), ((fused,),), split_qkv_bias, join_qkv_bias),
                Link(
                    (b + "attn.o.kernel",),
                    (p + "attn.c_proj.weight",),
                    ((D, D),),
                    lambda w: (contiguous(w).reshape(n, h, d),),
                    lambda k: (contiguous(k.reshape(d, d)),),
                ),
                same(b + "attn.o.bias", p + "attn.c_proj.bias", (D,)),
                same(b + "mlp_norm.scale", p + "ln_2.weight", (D,)),
                same(b + "mlp_norm.bias", p + "ln_2.bias", (D,)),
                same(b + "mlp.up.kernel", p + "mlp.c_fc.weight", (D, F)),
                same(b + "mlp.up.bias", p + "mlp.c_fc.bias", (F,)),
                same(b + "mlp.down.kernel", p + "mlp.c_proj.weight", (F, D)),
                same(b + "mlp.down.bias", p + "mlp.c_proj.bias", (D,)),
            ]
        out += [
            same("final_norm.scale", pre + "ln_f.weight", (D,)),
            same("final_norm.bias", pre + "ln_f.bias", (D,)),
        ]
        if not mc.tie_embeddings:
            out.append(
                Link(
                    ("head.kernel",),
                    ("lm_head.weight",),
                    ((V, D),),
                    lambda w: (contiguous(w.T),),
                    lambda k: (contiguous(k.T),),
                )
            )
        return out
