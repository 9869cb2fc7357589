"""The decoder-only transformer: one NNX module for every family the experiments name.

GPT-2: learned positions, LayerNorm, GELU, biases, tied embeddings.
Llama / Qwen2: RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head (Qwen2: q/k/v bias).
Mistral: every layer a sliding window; Gemma 2: local/global alternation, logit soft caps,
sandwich norms, a scaled embedding; Mixtral / DeepSeekMoE: mixture-of-experts MLPs.
All are the same pre-norm residual stack; `ModelConfig` (model_config.py) picks the pieces.
`causal=False` gives the bidirectional encoder used for BERT-style masked LM; a `prefix` mask
gives a prefix-LM.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lm.models.layers.attention import Attention, LayerCache
from lm.models.layers.linear import Dense, Embed, use_int_weights
from lm.models.layers.masks import soft_cap
from lm.models.layers.mlp import MLP
from lm.models.layers.moe import MoE, dense_aux
from lm.models.layers.norms import Norm
from lm.models.model_config import REMAT_POLICIES, ModelConfig  # noqa: F401 (re-exported)
from lm.sharding import constrain


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout with an explicit key; identity when rate is 0 or key is None (eval)."""
    if rate <= 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + mlp(norm(h)).

    With `cfg.post_norms` (Gemma 2's "sandwich" norms) each sublayer's output is normed again
    before the residual add: x + norm(attn(norm(x))); it bounds what one layer can add to the
    residual stream, which Gemma 2 pairs with its logit soft-capping for stable training.

    Layer `layer`'s `mlp` is a mixture of experts where `cfg.is_moe_layer(layer)`. The block
    returns an aux dict beside (x, cache): the MoE layer's router losses and statistics
    (lm/models/layers/moe.py), zeros for a dense layer of an MoE model, {} for a dense model.
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0, *, rngs: nnx.Rngs):
        def norm() -> Norm:
            return Norm(
                cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, cfg.dtype, cfg.param_dtype
            )

        self.attn_norm = norm()
        self.attn = Attention(cfg, layer, rngs=rngs)
        self.post_attn_norm = norm() if cfg.post_norms else None
        self.mlp_norm = norm()
        self.mlp = MoE(cfg, rngs=rngs) if cfg.is_moe_layer(layer) else MLP(cfg, rngs=rngs)
        self.post_mlp_norm = norm() if cfg.post_norms else None
        self.num_experts = cfg.num_experts
        self.dropout = cfg.dropout

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: LayerCache | None,
        cache_index: jax.Array | None,
        key: jax.Array | None,
        prefix: jax.Array | None = None,
        window: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None, dict[str, jax.Array]]:
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        h, cache = self.attn(
            self.attn_norm(x), positions, segment_ids, cache, cache_index, prefix, window
        )
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = constrain(x + dropout(h, self.dropout, keys[0]), ("batch", "seq", "embed"))
        if isinstance(self.mlp, MoE):
            h, aux = self.mlp(self.mlp_norm(x))
        else:
            h = self.mlp(self.mlp_norm(x))
            aux = dense_aux(self.num_experts) if self.num_experts > 0 else {}
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        x = constrain(x + dropout(h, self.dropout, keys[1]), ("batch", "seq", "embed"))
        return x, cache, aux


class Transformer(nnx.Module):
    """tokens [batch, seq] -> logits [batch, seq, vocab] (float32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(
            cfg.vocab_size,
            cfg.d_model,
            rngs=rngs,
            init_std=cfg.init_std,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
        )
        self.pos_embed = (
            Embed(
                cfg.max_seq_len,
                cfg.d_model,
                rngs=rngs,
                axes=(None, "embed"),
                init_std=cfg.init_std / 2,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
            )
            if cfg.position == "learned"
            else None
        )
        if cfg.scan_layers:
            # One Block whose params are stacked [num_layers, ...], applied with nnx.scan.
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_blocks(rngs: nnx.Rngs) -> Block:
                return Block(cfg, cfg.moe_first_dense, rngs=rngs)  # all layers alike

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = Norm(
            cfg.d_model, cfg.norm, cfg.norm_eps, cfg.use_bias, cfg.dtype, cfg.param_dtype
        )
        self.head = (
            None
            if cfg.tie_embeddings
            else Dense(
                (cfg.d_model,),
                (cfg.vocab_size,),
                ("embed", "vocab"),
                rngs=rngs,
                init_std=cfg.init_std,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
            )
        )
        if cfg.weight_bits:  # weight-only int8/int4 slots, filled from a checkpoint
            use_int_weights(self, cfg.weight_bits, cfg.weight_group_size)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: list[LayerCache] | LayerCache | None = None,
        cache_index: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        prefix: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        """Returns (logits [batch, seq, vocab] in float32, updated cache or None).

        `cache` is a list of per-layer caches, or one stacked cache when `scan_layers`.
        `dropout_key` turns dropout on (training); None is deterministic. `prefix` [batch, seq]
        marks positions that attend bidirectionally within their segment (prefix-LM).
        """
        x, cache = self.hidden(
            tokens, positions, segment_ids, cache, cache_index, dropout_key, prefix
        )
        return self.logits(x), cache

    def hidden(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: list[LayerCache] | LayerCache | None = None,
        cache_index: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        prefix: jax.Array | None = None,
    ) -> tuple[jax.Array, Any]:
        """Like `__call__`, but returns the final-normed hidden states [batch, seq, embed]
        (compute dtype) instead of logits; `logits(hidden)` finishes the forward pass."""
        x, cache, _ = self.hidden_and_aux(
            tokens, positions, segment_ids, cache, cache_index, dropout_key, prefix
        )
        return x, cache

    def hidden_and_aux(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: list[LayerCache] | LayerCache | None = None,
        cache_index: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
        prefix: jax.Array | None = None,
    ) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
        """`hidden`'s (hidden states, cache) and the MoE aux of every layer, each value stacked
        [layers, ...] (a scan output under `scan_layers`); {} for a dense model.
        `lm.models.layers.moe.reduce_layers` averages it over the MoE layers."""
        cfg = self.cfg
        x = self.embed(tokens)
        if cfg.embed_scale:  # Gemma: embeddings times sqrt(d_model), rounded to the dtype
            x = x * jnp.asarray(cfg.d_model**0.5, x.dtype)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        x = constrain(dropout(x, cfg.dropout, dropout_key), ("batch", "seq", "embed"))
        layer_keys = None
        if dropout_key is not None and cfg.dropout > 0:
            layer_keys = jax.random.split(jax.random.fold_in(dropout_key, 1), cfg.num_layers)

        def run_block(block, x, layer_cache, key, window=None):
            return block(x, positions, segment_ids, layer_cache, cache_index, key, prefix, window)

        if cfg.remat != "none":
            run_block = nnx.remat(run_block, policy=REMAT_POLICIES[cfg.remat])

        if cfg.scan_layers:
            # A mixed L/G pattern scans a per-layer window (0: global) beside the params.
            windows = _scan_windows(cfg)

            @nnx.scan(in_axes=(0, nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0, 0))
            def scan_blocks(block, x, layer_cache, key, window):
                return run_block(block, x, layer_cache, key, window)

            x, cache, aux = scan_blocks(self.blocks, x, cache, layer_keys, windows)
        else:
            new_cache = [] if cache is not None else None
            layer_aux = []
            for i, block in enumerate(self.blocks):
                layer_cache = cache[i] if cache is not None else None
                key = layer_keys[i] if layer_keys is not None else None
                x, layer_cache, block_aux = run_block(block, x, layer_cache, key)
                layer_aux.append(block_aux)
                if new_cache is not None:
                    new_cache.append(layer_cache)
            cache = new_cache
            aux = jax.tree.map(lambda *a: jnp.stack(a), *layer_aux) if layer_aux else {}
        return self.final_norm(x), cache, aux

    def head_matrix(self) -> tuple[jax.Array, str]:
        """The output projection as (matrix, layout): the tied `[vocab, embed]` embedding table
        ("ve") or the untied `[embed, vocab]` head kernel ("ev"), in the compute dtype."""
        if self.head is None:
            return self.embed.table().astype(self.cfg.dtype), "ve"
        return self.head.weight().astype(self.cfg.dtype), "ev"

    def logits(self, x: jax.Array) -> jax.Array:
        """Final hidden states [batch, seq, embed] -> logits [batch, seq, vocab] in float32."""
        logits = self.embed.attend(x) if self.head is None else self.head(x)
        logits = soft_cap(logits.astype(jnp.float32), self.cfg.final_logit_softcap)
        return constrain(logits, ("batch", "seq", "vocab"))

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Any:
        """Empty KV cache for `batch` sequences of up to `max_len` tokens.

        A global layer holds `max_len` slots; a local layer a ring buffer of
        min(sliding_window, max_len) slots. Each layer also records the absolute position in
        each slot ("pos", -1: empty). Under `scan_layers` the layers are stacked, so they share
        one length: the ring length when every layer is local, else `max_len` for all (a mixed
        pattern then masks its local layers' window over the full-length cache)."""
        cfg = self.cfg
        dtype = dtype or cfg.dtype
        local = [cfg.is_local_layer(i) for i in range(cfg.num_layers)]
        ring = min(cfg.sliding_window, max_len)

        def layer_cache(slots: int, lead: tuple = ()) -> LayerCache:
            shape = (*lead, batch, slots, cfg.num_kv_heads, cfg.head_dim)
            return {
                "k": jnp.zeros(shape, dtype),
                "v": jnp.zeros(shape, dtype),
                "pos": jnp.full((*lead, batch, slots), -1, jnp.int32),
            }

        if cfg.scan_layers:
            return layer_cache(ring if all(local) else max_len, (cfg.num_layers,))
        return [layer_cache(ring if is_local else max_len) for is_local in local]


def _scan_windows(cfg: ModelConfig) -> jax.Array | None:
    """Per-layer sliding windows [num_layers] (0: global) for a layer scan over a mixed L/G
    pattern; None when all layers are alike (the window is then static in the block)."""
    local = [cfg.is_local_layer(i) for i in range(cfg.num_layers)]
    if all(local) or not any(local):
        return None
    return jnp.asarray([cfg.sliding_window if x else 0 for x in local], jnp.int32)


def param_count(state: nnx.State) -> int:
    """Number of parameters in an nnx.State."""
    return sum(int(x.size) for x in jax.tree.leaves(state))


def active_param_count(state: nnx.State, cfg: ModelConfig) -> int:
    """Parameters used per token: the total, less the unrouted share of any expert-stacked
    parameter (logical axis "experts"; a mixture-of-experts model routes each token to
    `experts_per_token` of `num_experts`). Equals `param_count` for dense models."""
    share = getattr(cfg, "experts_per_token", 1) / max(1, getattr(cfg, "num_experts", 1))
    total = 0.0
    for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        size = int(v.get_value().size) if isinstance(v, nnx.Variable) else int(v.size)
        axes = v.get_metadata().get("axes", ()) if isinstance(v, nnx.Variable) else ()
        total += size * share if "experts" in (axes or ()) else size
    return int(total)


def experiment_param_counts(cfg) -> tuple[int, int]:
    """(total, active) parameter counts of an experiment config's model, from shapes only
    (nnx.eval_shape: nothing is allocated). model.vocab_size 0 takes the tokenizer's."""
    model_cfg = ModelConfig.from_config(cfg.model, cfg.model.vocab_size or cfg.tokenizer.vocab_size)
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    return param_count(state), active_param_count(state, model_cfg)
