"""Parameter and FLOP counts of a model config, by formula (no model is built).

MFU (model FLOPs utilisation) is computed from this analytic count, not from what XLA executes, so
rematerialisation does not inflate it; `lm plan` uses the same counts to size a run.
"""

from __future__ import annotations

from typing import Any


def _dims(model_cfg: Any) -> tuple[int, int, int, int, int, int, int]:
    """(layers, d_model, heads, kv_heads, head_dim, d_ff, vocab) with the 0-means-default rules."""
    num_heads = int(model_cfg.num_heads)
    d_model = int(model_cfg.d_model)
    head_dim = int(model_cfg.head_dim) or d_model // num_heads
    num_kv_heads = int(model_cfg.num_kv_heads) or num_heads
    return (
        int(model_cfg.num_layers),
        d_model,
        num_heads,
        num_kv_heads,
        head_dim,
        int(model_cfg.d_ff),
        int(model_cfg.vocab_size),
    )


def _mlp_matrices(model_cfg: Any) -> int:
    mlp = str(model_cfg.mlp)
    if mlp == "gelu":
        return 2  # up [d_model, d_ff], down [d_ff, d_model]
    if mlp in ("swiglu", "geglu"):
        return 3  # gate and up [d_model, d_ff], down [d_ff, d_model]
    raise ValueError(f"unknown mlp {mlp!r}; expected gelu, swiglu or geglu")


def _moe(model_cfg: Any) -> tuple[int, int, int, int, int]:
    """(MoE layers, experts E, experts per token k, shared experts, expert d_ff) with the
    rules of ModelConfig.is_moe_layer (layer >= moe_first_dense, every moe_every-th)."""
    experts = int(getattr(model_cfg, "num_experts", 0) or 0)
    if experts <= 0:
        return 0, 0, 0, 0, 0
    first = int(getattr(model_cfg, "moe_first_dense", 0))
    every = max(1, int(getattr(model_cfg, "moe_every", 1)))
    layers = sum(
        1 for i in range(int(model_cfg.num_layers)) if i >= first and (i - first) % every == 0
    )
    f = int(getattr(model_cfg, "moe_d_ff", 0) or 0) or int(model_cfg.d_ff)
    k = int(getattr(model_cfg, "experts_per_token", 2))
    return layers, experts, k, int(getattr(model_cfg, "num_shared_experts", 0)), f


def matmul_param_count(model_cfg: Any) -> int:
    """Weights that take part in a matmul per token: attention + MLP per layer, plus the LM head.

    This is the N of the PaLM 6N formula: the input embedding is a lookup (no FLOPs) and is
    excluded, but the LM head [d_model, vocab] is a real matmul and counts whether or not it is tied
    to the embedding. Biases and norm scales are not matmuls and are excluded. A mixture-of-experts
    layer counts its *active* weights: the router [d, E], the k routed experts a token goes
    through and the shared experts (the other E - k experts do no work for that token).
    """
    layers, d, h, kv, hd, d_ff, vocab = _dims(model_cfg)
    moe_layers, experts, k, shared, f = _moe(model_cfg)
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d  # q, k, v (GQA: kv heads), out
    mats = _mlp_matrices(model_cfg)
    mlp = mats * d * d_ff
    moe = d * experts + (k + shared) * mats * d * f
    return layers * attn + (layers - moe_layers) * mlp + moe_layers * moe + d * vocab


def model_flops_per_token(model_cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) following PaLM (Chowdhery et al. 2022, App. B).

    FLOPs = 6 N + 12 L H Q T, where
      * N = `matmul_param_count`: q [d, H*Q], k and v [d, KV*Q] each (grouped-query attention makes
        these smaller), output [H*Q, d], the MLP (2 matrices for gelu, 3 for swiglu) and the
        LM head [d, vocab]. A matmul of a [1, n] activation with an [n, m] weight is 2nm FLOPs
        forward; the backward pass costs twice the forward (grads w.r.t. inputs and weights),
        hence 3 x 2N = 6N.
      * 12 L H Q T is attention itself: per layer and token, QK^T ([T, Q] x [Q, T] per head) and
        AV each cost 2 T H Q FLOPs forward, so 4 L H Q T forward and 12 L H Q T for training.
        Following PaLM, this is NOT halved for the causal mask (the full T x T score matrix is
        counted), so MFU is comparable with published PaLM-convention numbers.
    Q = head_dim, H = num_heads (the query heads: K/V sharing in GQA does not shrink the score
    matmuls), T = seq_len. Norms, softmax, activations and the embedding lookup are ignored.
    """
    layers, _, h, _, hd, _, _ = _dims(model_cfg)
    n = matmul_param_count(model_cfg)
    return float(6 * n + 12 * layers * h * hd * int(seq_len))


def param_count(model_cfg: Any) -> int:
    """Number of parameters of the model, by formula (to cross-check against the real pytree).

    Assumed layout (pre-norm decoder):
      * token embedding [vocab, d_model]; learned positions [max_seq_len, d_model] when
        position == "learned" (rope has none);
      * per layer: 2 norms (4 with post_norms, Gemma 2); q [d, H*Q], k and v [d, KV*Q], out
        [H*Q, d], each with a bias when use_bias (q, k and v only with qkv_bias, Qwen2);
        MLP gelu: up [d, d_ff] + down [d_ff, d]; swiglu / geglu: gate and up [d, d_ff] + down,
        biases when use_bias;
      * a final norm; an untied LM head [d, vocab] (never a bias) when tie_embeddings is false;
      * a mixture-of-experts layer (lm/models/layers/moe.py) replaces the MLP by a router
        [d, E] (+ a bias [E] for the sigmoid router), E experts of gate/up [d, moe_d_ff] and
        down [moe_d_ff, d] (swiglu; gelu has no gate; experts have no biases) and shared
        experts: one MLP of d_ff = num_shared_experts * moe_d_ff (biases when use_bias).
    A layernorm has a scale [d] and, when use_bias, a bias [d]; an rmsnorm only a scale.
    """
    layers, d, h, kv, hd, d_ff, vocab = _dims(model_cfg)
    use_bias = bool(getattr(model_cfg, "use_bias", False))
    norm = str(getattr(model_cfg, "norm", "layernorm"))
    mlp_mats = _mlp_matrices(model_cfg)

    total = vocab * d
    if str(getattr(model_cfg, "position", "rope")) == "learned":
        total += int(model_cfg.max_seq_len) * d

    norm_params = d * (2 if (norm == "layernorm" and use_bias) else 1)
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if use_bias or bool(getattr(model_cfg, "qkv_bias", False)):
        attn += h * hd + 2 * kv * hd
    if use_bias:
        attn += d
    layer_norms = 4 if bool(getattr(model_cfg, "post_norms", False)) else 2

    def mlp_params(width: int) -> int:
        return mlp_mats * d * width + ((mlp_mats - 1) * width + d if use_bias else 0)

    moe_layers, experts, _, shared, f = _moe(model_cfg)
    moe = d * experts + experts * mlp_mats * d * f + (mlp_params(shared * f) if shared else 0)
    if str(getattr(model_cfg, "router", "softmax")) == "sigmoid":
        moe += experts
    total += layers * (attn + layer_norms * norm_params) + (layers - moe_layers) * mlp_params(d_ff)
    total += moe_layers * moe
    total += norm_params  # final norm
    if not bool(model_cfg.tie_embeddings):
        total += d * vocab
    return total


def active_param_count(model_cfg: Any) -> int:
    """Parameters a token uses: `param_count` less the E - k routed experts it skips in every
    mixture-of-experts layer (the convention of Mixtral's "12.9B active" and DeepSeekMoE's
    "2.8B activated"). Equals `param_count` for a dense model."""
    moe_layers, experts, k, _, f = _moe(model_cfg)
    skipped = moe_layers * (experts - k) * _mlp_matrices(model_cfg) * int(model_cfg.d_model) * f
    return param_count(model_cfg) - skipped
