"""`ModelConfig`: the model group of an experiment config, resolved and checked.

One frozen dataclass that every layer reads: 0 / "auto" values filled in (kv heads, head_dim,
dtype, the experts' width), choices checked with one-line `ConfigError`s, and the per-layer
questions (is layer i MoE? local?) answered in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lm.errors import ConfigError
from lm.models.layers.attention import ATTENTION_IMPLEMENTATIONS

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Resolved model hyperparameters (`num_kv_heads`, `head_dim` and `dtype` filled in)."""

    vocab_size: int
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int
    position: str
    rope_theta: float
    norm: str
    norm_eps: float
    mlp: str
    use_bias: bool
    tie_embeddings: bool
    dropout: float
    init_std: float
    dtype: Any
    param_dtype: Any
    remat: str
    scan_layers: bool
    attention: str
    causal: bool
    loss_chunk: int = 0
    qkv_bias: bool = False
    attention_pattern: str = "G"
    sliding_window: int = 0
    attn_logit_softcap: float = 0.0
    final_logit_softcap: float = 0.0
    post_norms: bool = False
    embed_scale: bool = False
    num_experts: int = 0
    experts_per_token: int = 2
    num_shared_experts: int = 0
    moe_d_ff: int = 0
    moe_every: int = 1
    moe_first_dense: int = 0
    router: str = "softmax"
    router_norm_topk: bool = True
    moe_dispatch: str = "dropless"
    capacity_factor: float = 1.25
    grouped_matmul: str = "auto"
    load_balance_weight: float = 0.01
    router_z_weight: float = 0.001
    router_bias_rate: float = 0.001
    weight_bits: int = 0  # 8 | 4: Dense/Embed weights held as ints + scales (`lm quantize`)
    weight_group_size: int = 0  # weights per scale along the contraction axis; 0: per channel

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) has a mixture-of-experts MLP."""
        if self.num_experts <= 0 or layer < self.moe_first_dense:
            return False
        return (layer - self.moe_first_dense) % self.moe_every == 0

    def is_local_layer(self, layer: int) -> bool:
        """Whether layer `layer` attends within a sliding window (its `attention_pattern` letter
        is L) rather than to the whole context (G)."""
        return self.attention_pattern[layer % len(self.attention_pattern)] == "L"

    @classmethod
    def from_config(cls, model_cfg, vocab_size: int | None = None) -> ModelConfig:
        """Builds from the `model` group of an experiment config; fills the 0 / "auto" values."""
        values = {
            f.name: model_cfg[f.name] if f.name in model_cfg else f.default
            for f in dataclasses.fields(cls)
        }
        if vocab_size:
            values["vocab_size"] = vocab_size
        if values["vocab_size"] <= 0:
            raise ConfigError("model.vocab_size is 0 and no tokenizer gave one")
        if values["num_heads"] <= 0 or values["d_model"] <= 0:
            raise ConfigError("model.num_heads and model.d_model must be positive")
        values["num_kv_heads"] = values["num_kv_heads"] or values["num_heads"]
        if values["num_heads"] % values["num_kv_heads"]:
            raise ConfigError("model.num_heads must be a multiple of model.num_kv_heads")
        values["head_dim"] = values["head_dim"] or values["d_model"] // values["num_heads"]
        if values["position"] not in ("learned", "rope"):
            raise ConfigError(f"model.position must be learned or rope, got {values['position']!r}")
        if values["remat"] not in ("none", *REMAT_POLICIES):
            raise ConfigError(f"model.remat must be none, full or dots, got {values['remat']!r}")
        if values["dtype"] == "auto":
            values["dtype"] = "float32" if jax.default_backend() == "cpu" else "bfloat16"
        values["dtype"] = jnp.dtype(values["dtype"])
        values["param_dtype"] = jnp.dtype(values["param_dtype"])
        if values["attention"] not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(
                f"model.attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, "
                f"got {values['attention']!r}"
            )
        if values["loss_chunk"] < 0:
            raise ConfigError("model.loss_chunk must be >= 0 (0: no chunking)")
        pattern = values["attention_pattern"]
        if not pattern or set(pattern) - {"L", "G"}:
            raise ConfigError(
                f"model.attention_pattern must be letters L (local) and G (global), got {pattern!r}"
            )
        if "L" in pattern and values["sliding_window"] <= 0:
            raise ConfigError("model.attention_pattern has local layers: set model.sliding_window")
        values["moe_d_ff"] = values["moe_d_ff"] or values["d_ff"]
        if values["num_experts"] > 0:
            if not 0 < values["experts_per_token"] <= values["num_experts"]:
                raise ConfigError("model.experts_per_token must be in 1..model.num_experts")
            if values["moe_every"] < 1:
                raise ConfigError("model.moe_every must be >= 1")
            _check_choice(values, "router", ("softmax", "sigmoid"))
            _check_choice(values, "moe_dispatch", ("dropless", "capacity"))
            _check_choice(values, "grouped_matmul", ("auto", "ragged_dot", "tokamax", "tiled"))
            if values["scan_layers"]:
                pattern = {_is_moe(values, i) for i in range(values["num_layers"])}
                if len(pattern) > 1:
                    raise ConfigError(
                        "model.scan_layers needs every layer alike: with moe_first_dense / "
                        "moe_every some layers are dense; set model.scan_layers=False"
                    )
        if values["weight_bits"] not in (0, 8, 4):
            raise ConfigError(f"model.weight_bits must be 0, 8 or 4, got {values['weight_bits']}")
        if values["weight_group_size"] < 0 or (
            values["weight_group_size"] and not values["weight_bits"]
        ):
            raise ConfigError("model.weight_group_size must be >= 0 and needs model.weight_bits")
        return cls(**values)


def _is_moe(values: dict, layer: int) -> bool:
    first, every = values["moe_first_dense"], values["moe_every"]
    return values["num_experts"] > 0 and layer >= first and (layer - first) % every == 0


def _check_choice(values: dict, key: str, options: tuple[str, ...]) -> None:
    if values[key] not in options:
        raise ConfigError(f"model.{key} must be one of {', '.join(options)}, got {values[key]!r}")
