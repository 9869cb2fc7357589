"""Llama-style families: Llama (GQA, tied or untied), Mistral (sliding window), Qwen2 (q/k/v
bias), Mixtral (mixture of experts).

All four are the same pre-norm RMSNorm / SwiGLU / RoPE stack under `model.layers.<i>.`; every
projection is a torch Linear `[out, in]`, transposed and reshaped into our `[in..., out...]`
kernels (q `[d_model, heads, head_dim]`, o `[heads, head_dim, d_model]`). Hugging Face's rotary
is the half-split one (`rotate_half`: channel i pairs with i + head_dim/2, frequency
theta^(-2i/head_dim)), the same as lm/models/layers/rotary.py, so q and k need no permutation.
Mixtral's router `block_sparse_moe.gate [E, d]` becomes `mlp.router.kernel [d, E]` and its
experts w1 / w3 / w2 (`[f, d]`, `[f, d]`, `[d, f]`) are stacked into `mlp.gate` / `mlp.up`
`[E, d, f]` and `mlp.down` `[E, f, d]` (lm/models/layers/moe.py).
"""

from __future__ import annotations

import numpy as np

from lm.convert.common import (
    Dim,
    Family,
    Link,
    contiguous,
    get_key,
    linear,
    require_int,
    rope_theta,
    same,
    vector,
)
from lm.errors import ConfigError

_SILU = ("silu", "swish")


class LlamaFamily(Family):
    architecture = "LlamaForCausalLM"
    model_type = "llama"
    tie_default = False

    # -- config ---------------------------------------------------------------------------------

    def model_keys(self, hf: dict) -> dict:
        arch = self.architecture
        d = require_int(hf, "hidden_size", arch)
        n = require_int(hf, "num_attention_heads", arch)
        if hf.get("hidden_act", "silu") not in _SILU:
            raise ConfigError(
                f"config.json hidden_act={hf.get('hidden_act')!r} is not supported for {arch} "
                "(lm's SwiGLU uses silu)"
            )
        layers = require_int(hf, "num_hidden_layers", arch)
        pattern, window = self.attention_pattern(hf, layers)
        use_bias, qkv_bias = self.biases(hf)
        keys = dict(
            vocab_size=require_int(hf, "vocab_size", arch),
            num_layers=layers,
            d_model=d,
            num_heads=n,
            num_kv_heads=int(get_key(hf, "num_key_value_heads", default=n)),
            head_dim=int(get_key(hf, "head_dim", default=d // n)),
            d_ff=require_int(hf, "intermediate_size", arch),
            max_seq_len=int(get_key(hf, "max_position_embeddings", default=2048)),
            position="rope",
            rope_theta=rope_theta(hf, arch),
            norm="rmsnorm",
            norm_eps=float(get_key(hf, "rms_norm_eps", default=1e-6)),
            mlp="swiglu",
            use_bias=use_bias,
            qkv_bias=qkv_bias,
            tie_embeddings=bool(get_key(hf, "tie_word_embeddings", default=self.tie_default)),
            attention_pattern=pattern,
            sliding_window=window,
            init_std=float(get_key(hf, "initializer_range", default=0.02)),
            dropout=0.0,
        )
        keys.update(self.moe_keys(hf))
        return keys

    def biases(self, hf: dict) -> tuple[bool, bool]:
        """(use_bias, qkv_bias). Llama's attention_bias covers q, k, v and o; mlp_bias the MLP;
        lm's use_bias is all of them at once."""
        attn, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attn != mlp:
            raise ConfigError(
                f"config.json attention_bias={attn} with mlp_bias={mlp} is not supported "
                "(lm's model.use_bias puts biases on both)"
            )
        return attn, False

    def attention_pattern(self, hf: dict, layers: int) -> tuple[str, int]:
        """(model.attention_pattern, model.sliding_window): all global for Llama."""
        del hf, layers
        return "G", 0

    def moe_keys(self, hf: dict) -> dict:
        del hf
        return {}

    def hf_config(self, mc, base: dict) -> dict:
        out = dict(base)
        out.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            vocab_size=mc.vocab_size,
            hidden_size=mc.d_model,
            intermediate_size=mc.d_ff,
            num_hidden_layers=mc.num_layers,
            num_attention_heads=mc.num_heads,
            num_key_value_heads=mc.num_kv_heads,
            max_position_embeddings=mc.max_seq_len,
            rms_norm_eps=mc.norm_eps,
            hidden_act="silu",
            tie_word_embeddings=mc.tie_embeddings,
        )
        # head_dim: written unless it is the default d_model / heads and the imported config
        # left it out or null (so from_hf -> to_hf gives back the same config.json).
        default_head = mc.head_dim * mc.num_heads == mc.d_model
        if not base or base.get("head_dim") is not None or not default_head:
            out["head_dim"] = mc.head_dim
        theta = float(mc.rope_theta)
        out["rope_parameters"] = {**(base.get("rope_parameters") or {}), "rope_theta": theta}
        out["rope_parameters"].setdefault("rope_type", "default")
        if "rope_theta" in base:  # a transformers 4.x config keeps its own key
            out["rope_theta"] = theta
        self.hf_extra(mc, out)
        return out

    def hf_extra(self, mc, out: dict) -> None:
        out["attention_bias"] = mc.use_bias
        out["mlp_bias"] = mc.use_bias

    # -- tensors --------------------------------------------------------------------------------

    def dims(self, mc) -> dict[str, Dim]:
        return dict(
            V=Dim(mc.vocab_size, "vocab_size"),
            D=Dim(mc.d_model, "hidden_size"),
            N=Dim(mc.num_heads, "num_attention_heads"),
            K=Dim(mc.num_kv_heads, "num_key_value_heads"),
            H=Dim(mc.head_dim, "head_dim"),
            F=Dim(mc.d_ff, "intermediate_size"),
        )

    def links(self, mc, fmt: str = "") -> list[Link]:
        x = self.dims(mc)
        V, D, N, K, H = x["V"], x["D"], x["N"], x["K"], x["H"]
        qkv_bias = mc.use_bias or mc.qkv_bias
        out = [same("embed.embedding", "model.embed_tokens.weight", (V, D))]
        for i in range(mc.num_layers):
            p, b = f"model.layers.{i}.", f"blocks.{i}."
            a = p + "self_attn."
            out.append(same(b + "attn_norm.scale", p + "input_layernorm.weight", (D,)))
            for ours, hf, heads in (("q", "q_proj", N), ("k", "k_proj", K), ("v", "v_proj", K)):
                out.append(linear(f"{b}attn.{ours}.kernel", f"{a}{hf}.weight", (D,), (heads, H)))
                if qkv_bias:
                    out.append(vector(f"{b}attn.{ours}.bias", f"{a}{hf}.bias", (heads, H)))
            out.append(linear(b + "attn.o.kernel", a + "o_proj.weight", (N, H), (D,)))
            if mc.use_bias:
                out.append(vector(b + "attn.o.bias", a + "o_proj.bias", (D,)))
            out.append(same(b + "mlp_norm.scale", p + "post_attention_layernorm.weight", (D,)))
            out.extend(self.mlp_links(mc, i, p, b, x, fmt))
        out.append(same("final_norm.scale", "model.norm.weight", (D,)))
        if not mc.tie_embeddings:
            out.append(linear("head.kernel", "lm_head.weight", (D,), (V,)))
        return out

    def mlp_links(self, mc, i: int, p: str, b: str, x: dict, fmt: str) -> list[Link]:
        del i, fmt
        D, F = x["D"], x["F"]
        out = []
        for ours, hf, ins, outs in (
            ("gate", "gate_proj", D, F),
            ("up", "up_proj", D, F),
            ("down", "down_proj", F, D),
        ):
            out.append(linear(f"{b}mlp.{ours}.kernel", f"{p}mlp.{hf}.weight", (ins,), (outs,)))
            if mc.use_bias:
                out.append(vector(f"{b}mlp.{ours}.bias", f"{p}mlp.{hf}.bias", (outs,)))
        return out


class MistralFamily(LlamaFamily):
    """Llama plus a sliding window on every layer (`sliding_window`, null for none)."""

    architecture = "MistralForCausalLM"
    model_type = "mistral"

    def biases(self, hf: dict) -> tuple[bool, bool]:
        del hf
        return False, False

    def attention_pattern(self, hf: dict, layers: int) -> tuple[str, int]:
        del layers
        window = hf.get("sliding_window")
        return ("L", int(window)) if window else ("G", 0)

    def hf_extra(self, mc, out: dict) -> None:
        out["sliding_window"] = mc.sliding_window if "L" in mc.attention_pattern else None


class Qwen2Family(LlamaFamily):
    """Llama with biases on q, k and v only (model.qkv_bias); sliding-window layers where
    `layer_types` says "sliding_attention" (use_sliding_window)."""

    architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"

    def biases(self, hf: dict) -> tuple[bool, bool]:
        del hf
        return False, True

    def attention_pattern(self, hf: dict, layers: int) -> tuple[str, int]:
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        types = hf.get("layer_types")
        if not types:
            first = int(hf.get("max_window_layers", layers))
            types = [
                "sliding_attention" if window and i >= first else "full_attention"
                for i in range(layers)
            ]
        if len(types) != layers:
            raise ConfigError(
                f"config.json layer_types has {len(types)} entries but num_hidden_layers={layers}"
            )
        letters = "".join("L" if t == "sliding_attention" else "G" for t in types)
        if "L" not in letters:
            return "G", 0
        if not window:
            raise ConfigError("config.json has sliding_attention layers but no sliding_window")
        return (letters[0] if len(set(letters)) == 1 else letters), int(window)

    def hf_extra(self, mc, out: dict) -> None:
        local = [mc.is_local_layer(i) for i in range(mc.num_layers)]
        out["use_sliding_window"] = any(local)
        out["sliding_window"] = mc.sliding_window if any(local) else None
        out["layer_types"] = ["sliding_attention" if x else "full_attention" for x in local]
        if any(local):
            out["max_window_layers"] = local.index(True)


class MixtralFamily(MistralFamily):
    """Mistral with a top-k softmax router over `num_local_experts` SwiGLU experts."""

    architecture = "MixtralForCausalLM"
    model_type = "mixtral"

    def moe_keys(self, hf: dict) -> dict:
        arch = self.architecture
        return dict(
            num_experts=require_int(hf, "num_local_experts", arch),
            experts_per_token=require_int(hf, "num_experts_per_tok", arch),
            moe_d_ff=require_int(hf, "intermediate_size", arch),
            router="softmax",
            router_norm_topk=True,
            num_shared_experts=0,
            moe_every=1,
            moe_first_dense=0,
        )

    def hf_extra(self, mc, out: dict) -> None:
        super().hf_extra(mc, out)
        out.update(
            num_local_experts=mc.num_experts,
            num_experts_per_tok=mc.experts_per_token,
            intermediate_size=mc.moe_d_ff,
        )
        out.setdefault("router_jitter_noise", 0.0)

    def dims(self, mc) -> dict[str, Dim]:
        return {
            **super().dims(mc),
            "F": Dim(mc.moe_d_ff, "intermediate_size"),
            "E": Dim(mc.num_experts, "num_local_experts"),
        }

    def detect_format(self, names: set[str]) -> str:
        """ "fused": transformers 5's in-memory layout (mlp.experts.gate_up_proj) saved as is;
        "" : the published one (block_sparse_moe.experts.<e>.w1/w2/w3)."""
        return "fused" if any(n.endswith("mlp.experts.gate_up_proj") for n in names) else ""

    def mlp_links(self, mc, i: int, p: str, b: str, x: dict, fmt: str) -> list[Link]:
        del i
        D, F, E = x["D"], x["F"], x["E"]
        e, f = E.size, F.size

        def t(w):  # [E, a, b] <-> [E, b, a]
            return contiguous(np.swapaxes(w, 1, 2))

        if fmt == "fused":
            m = p + "mlp."
            return [
                linear(b + "mlp.router.kernel", m + "gate.weight", (D,), (E,)),
                Link(
                    (b + "mlp.gate", b + "mlp.up"),
                    (m + "experts.gate_up_proj",),
                    ((E, Dim(2 * f, "2*intermediate_size"), D),),
                    lambda gu: (t(gu[:, :f]), t(gu[:, f:])),
                    lambda g, u: (contiguous(np.concatenate([t(g), t(u)], axis=1)),),
                ),
                Link(
                    (b + "mlp.down",),
                    (m + "experts.down_proj",),
                    ((E, D, F),),
                    lambda w: (t(w),),
                    lambda w: (t(w),),
                ),
            ]
        m = p + "block_sparse_moe."
        out = [linear(b + "mlp.router.kernel", m + "gate.weight", (D,), (E,))]
        for ours, w, shape in (
            ("gate", "w1", (F, D)),
            ("up", "w3", (F, D)),
            ("down", "w2", (D, F)),
        ):
            names = tuple(f"{m}experts.{j}.{w}.weight" for j in range(e))
            out.append(
                Link(
                    (f"{b}mlp.{ours}",),
                    names,
                    (shape,) * e,
                    lambda *ws: (np.stack([w.T for w in ws]),),
                    lambda s: tuple(contiguous(s[j].T) for j in range(s.shape[0])),
                )
            )
        return out
