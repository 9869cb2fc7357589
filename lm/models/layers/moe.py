"""Mixture-of-experts feed-forward layer (Mixtral, DeepSeekMoE / DeepSeek-V3 style).

A router scores each token against E experts and sends it to its top k; the token's output is
the gate-weighted sum of those experts' feed-forward outputs, plus optional always-on shared
experts. Parameter layout (Hugging Face conversion depends on it):
  router.kernel [embed, E]; router_bias [E] (sigmoid router only);
  gate, up [E, embed, mlp] (gate for swiglu only); down [E, mlp, embed]; shared: an `MLP`.
Experts carry no biases (as Mixtral, DeepSeek and Switch).

Every MoE layer also returns an aux dict (see `layer_aux`): the Switch load-balancing loss,
the ST-MoE router z-loss, the dropped fraction, the router entropy and the per-expert load.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lm.models.layers.linear import Dense
from lm.models.layers.mlp import MLP
from lm.models.layers.moe_dispatch import capacity, capacity_slots, dispatch, grouped_matmul
from lm.quantize.numerics import dequantize, group_count, int_dtype
from lm.sharding import constrain

AUX_SCALARS = ("load_balance_loss", "router_z_loss", "dropped_fraction", "router_entropy")
# The train-step metric (summed like the others) that the sigmoid router's bias update reads.
PER_LAYER_LOAD = "moe/expert_load_per_layer"


def route(
    logits: jax.Array, bias: jax.Array | None, k: int, router: str, norm_topk: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits [..., E] -> (experts [..., k] int32, gates [..., k], probs [..., E]).

    softmax (Mixtral): probs = softmax(logits); the k largest are chosen and, when `norm_topk`,
    renormalized to sum to 1. sigmoid (DeepSeek-V3): scores = sigmoid(logits); the experts are
    chosen on scores + bias (the bias balances load and never enters a gate or a gradient); the
    gates are the chosen scores, normalized when `norm_topk`. `probs` (for the balance loss and
    the entropy) are the softmax, or the scores normalized to sum to 1.
    """
    logits = logits.astype(jnp.float32)
    if router == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
        gates, experts = jax.lax.top_k(probs, k)
    elif router == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        choice = scores if bias is None else scores + jax.lax.stop_gradient(bias)
        _, experts = jax.lax.top_k(choice, k)
        gates = jnp.take_along_axis(scores, experts, axis=-1)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    else:
        raise ValueError(f"model.router must be softmax or sigmoid, got {router!r}")
    if norm_topk:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return experts.astype(jnp.int32), gates, probs


def router_losses(
    logits: jax.Array, probs: jax.Array, experts: jax.Array, num_experts: int
) -> dict[str, jax.Array]:
    """Aux losses and statistics over all tokens of logits/probs [..., E], experts [..., k].

    load_balance_loss (Switch Transformer): E * sum_e f_e * P_e, f_e the fraction of the
      token-to-expert assignments that go to e (no gradient), P_e the mean router probability
      of e; 1 when both are uniform.
    router_z_loss (ST-MoE): mean over tokens of logsumexp(logits)^2, keeps logits small.
    router_entropy: mean over tokens of the entropy of probs (nats; log E when uniform).
    expert_load [E]: f_e.
    """
    e = num_experts
    load = jnp.mean(jax.nn.one_hot(experts, e, dtype=jnp.float32), axis=tuple(range(experts.ndim)))
    mean_prob = jnp.mean(probs.reshape(-1, e), axis=0)
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    entropy = jnp.sum(jax.scipy.special.entr(jax.lax.stop_gradient(probs)), axis=-1)
    return {
        "load_balance_loss": e * jnp.sum(jax.lax.stop_gradient(load) * mean_prob),
        "router_z_loss": jnp.mean(z**2),
        "router_entropy": jnp.mean(entropy),
        "expert_load": load,
    }


def dense_aux(num_experts: int) -> dict[str, jax.Array]:
    """The aux of a dense layer in a model that has MoE layers: zeros, `moe_layer` 0, so every
    layer returns the same structure (scan) and the averages skip it."""
    zero = jnp.zeros((), jnp.float32)
    aux = {name: zero for name in AUX_SCALARS}
    return {**aux, "expert_load": jnp.zeros((num_experts,), jnp.float32), "moe_layer": zero}


def reduce_layers(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-layer aux (each value stacked [layers, ...]) -> the mean over MoE layers: scalars,
    `expert_load` [E], plus `expert_load_per_layer` [layers, E] for the router-bias update."""
    if not aux:
        return {}
    mask = aux["moe_layer"]
    n = jnp.maximum(jnp.sum(mask), 1.0)
    out = {name: jnp.sum(aux[name] * mask) / n for name in AUX_SCALARS}
    out["expert_load"] = jnp.sum(aux["expert_load"] * mask[:, None], axis=0) / n
    out["expert_load_per_layer"] = aux["expert_load"]
    return out


def aux_template(cfg) -> dict[str, jax.Array]:
    """Zeros shaped like `reduce_layers`' output for `cfg` ({} for a dense model): the start of
    a sum over micro-batches."""
    if cfg.num_experts <= 0:
        return {}
    zero = jnp.zeros((), jnp.float32)
    out = {name: zero for name in AUX_SCALARS}
    out["expert_load"] = jnp.zeros((cfg.num_experts,), jnp.float32)
    out["expert_load_per_layer"] = jnp.zeros((cfg.num_layers, cfg.num_experts), jnp.float32)
    return out


def aux_penalty(aux: dict[str, jax.Array], cfg) -> jax.Array:
    """The weighted aux losses added to the training objective (0 for a dense model)."""
    if not aux:
        return jnp.zeros((), jnp.float32)
    return (
        cfg.load_balance_weight * aux["load_balance_loss"]
        + cfg.router_z_weight * aux["router_z_loss"]
    )


class MoE(nnx.Module):
    """x [batch, seq, embed] -> (y [batch, seq, embed], aux): top-k routed experts + shared."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        if cfg.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"model.mlp must be gelu or swiglu, got {cfg.mlp!r}")
        e, d, f = cfg.num_experts, cfg.d_model, cfg.moe_d_ff
        self.cfg = cfg
        # The router runs in float32: top-k on bf16 logits flips near-ties.
        self.router = Dense(
            (d,),
            (e,),
            ("embed", None),
            rngs=rngs,
            init_std=cfg.init_std,
            dtype=jnp.float32,
            param_dtype=cfg.param_dtype,
        )
        # Aux-loss-free balancing bias (DeepSeek-V3): changed only by `update_router_bias`.
        self.router_bias = (
            nnx.Param(jnp.zeros((e,), jnp.float32), axes=(None,))
            if cfg.router == "sigmoid"
            else None
        )

        def stack(shape, axes, std):
            init = jax.nn.initializers.normal(std)
            return nnx.Param(init(rngs.params(), shape, cfg.param_dtype), axes=axes)

        in_axes, out_axes = ("experts", "embed", "mlp"), ("experts", "mlp", "embed")
        self.gate = stack((e, d, f), in_axes, cfg.init_std) if cfg.mlp == "swiglu" else None
        self.up = stack((e, d, f), in_axes, cfg.init_std)
        self.down = stack((e, f, d), out_axes, cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        self.shared = (
            MLP(dataclasses.replace(cfg, d_ff=cfg.num_shared_experts * f), rngs=rngs)
            if cfg.num_shared_experts > 0
            else None
        )
        # The router stays float under weight-only quantization: top-k on rounded logits
        # would flip near-ties, and it is E columns of d_model, a sliver of the layer.
        self.router.keep_float = True
        # Weight-only quantization (`to_int`): float32 scales [..., E, groups, out] per stack.
        self.gate_scale = nnx.data(None)
        self.up_scale = nnx.data(None)
        self.down_scale = nnx.data(None)

    def to_int(self, bits: int, group_size: int) -> None:
        """Int slots for the expert stacks (same shapes and axes) plus float32 scales with
        the contraction axis cut into groups (1 per output channel per expert by default);
        `lm quantize` fills them. Stacked (scanned) layers [layers, E, ...] work too."""
        for name in ("gate", "up", "down"):
            param = getattr(self, name)
            if param is None:
                continue
            shape = param.get_value().shape
            axes = tuple(param.get_metadata().get("axes", ()))
            groups = group_count(shape[-2], group_size)
            setattr(self, name, nnx.Param(jnp.zeros(shape, int_dtype(bits)), axes=axes))
            scale = jnp.ones((*shape[:-2], groups, shape[-1]), jnp.float32)
            setattr(self, f"{name}_scale", nnx.Param(scale, axes=(*axes[:-2], None, axes[-1])))

    def expert_weight(self, name: str) -> jax.Array:
        """Expert stack `name` (gate / up: [E, embed, mlp]; down: [E, mlp, embed]) in the
        compute dtype, dequantized when it is held as ints."""
        scale = getattr(self, f"{name}_scale")
        value = getattr(self, name)[...]
        if scale is None:
            return value.astype(self.cfg.dtype)
        return dequantize(value, scale[...], -2, self.cfg.dtype)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        b, s, _ = x.shape
        logits = constrain(self.router(x), ("batch", "seq", None))  # [batch, seq, E] f32
        bias = None if self.router_bias is None else self.router_bias[...]
        experts, gates, probs = route(
            logits, bias, cfg.experts_per_token, cfg.router, cfg.router_norm_topk
        )
        aux = router_losses(logits, probs, experts, cfg.num_experts)
        slot, cap = None, 0
        if cfg.moe_dispatch == "capacity":
            cap = capacity(s, cfg.experts_per_token, cfg.num_experts, cfg.capacity_factor)
            slot, keep = capacity_slots(experts, cfg.num_experts, cap)
            aux["dropped_fraction"] = 1.0 - jnp.mean(keep.astype(jnp.float32))
        else:
            aux["dropped_fraction"] = jnp.zeros((), jnp.float32)
        aux["moe_layer"] = jnp.ones((), jnp.float32)
        names = ("gate", "up", "down") if self.gate is not None else ("up", "down")
        weights = {n: self.expert_weight(n) for n in names}
        y = dispatch(
            x.astype(cfg.dtype),
            experts,
            gates,
            slot,
            weights,
            mlp=cfg.mlp,
            mode=cfg.moe_dispatch,
            cap=cap,
            matmul=grouped_matmul(cfg.grouped_matmul),
        )
        y = constrain(y.astype(cfg.dtype), ("batch", "seq", "embed"))
        if self.shared is not None:
            y = y + self.shared(x)
        return y, aux


def _path_names(path) -> list:
    return [getattr(p, "key", getattr(p, "name", getattr(p, "idx", None))) for p in path]


def update_router_bias(old_params, new_params, load_per_layer: jax.Array, rate: float, apply):
    """new_params with every `router_bias` set to old + rate * sign(1/E - load) (DeepSeek-V3's
    aux-loss-free balancing: an overloaded expert's bias falls, an idle one's rises).

    The bias is an nnx.Param, so it is checkpointed with the train state, but the optimizer's
    value for it is discarded here: only this rule moves it (it has no gradient and no weight
    decay either). `load_per_layer` [layers, E] is the fraction of assignments per expert;
    `apply` (a bool array) is False for a skipped update, which then keeps the old bias.
    """

    def one(path, old, new):
        names = _path_names(path)
        if "router_bias" not in names:
            return new
        if old.ndim == 2:  # scanned layers: [layers, E]
            load = load_per_layer
        else:
            load = load_per_layer[int(names[names.index("blocks") + 1])]
        step = rate * jnp.sign(1.0 / old.shape[-1] - load)
        return jnp.where(apply, old + step.astype(old.dtype), old)

    return jax.tree_util.tree_map_with_path(one, old_params, new_params)
