"""What a train step optimizes, as a pluggable part of the one trainer (lm/training/train_step.py).

An `Objective` says which model the params are of (`build`), which of its params train
(`trainable`, an nnx filter: all `nnx.Param`s, or only LoRA adapters), what a batch holds
(`batch_spec`: feature -> (per-row shape, dtype); every feature has the batch as its leading
axis) and the loss of one (micro-)batch as *sums* (`LossSums`), so the trainer can divide by
the total weight after gradient accumulation and the accumulated update equals the large-batch
one. Pretraining and SFT use `LanguageModelObjective`; lm/finetune/objectives.py adds the reward
model, DPO, PPO and GRPO objectives.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lm.models.layers import moe
from lm.models.loss import chunked_cross_entropy
from lm.models.transformer import ModelConfig, Transformer

# [batch, seq] token features of language-model rows (lm/data/grain_pipeline.py).
LM_FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")


class LossSums(NamedTuple):
    """One batch's loss as sums over its examples / tokens.

    objective: what is differentiated (e.g. cross-entropy plus MoE aux losses);
    loss: what is reported as `loss` (summed); weight: the count both are divided by (tokens,
    pairs, sequences); metrics: other summed values, reported divided by the same weight."""

    objective: jax.Array
    loss: jax.Array
    weight: jax.Array
    metrics: dict[str, jax.Array]


class Objective:
    """The default: a `Transformer` whose every Param trains. Subclasses override parts."""

    trainable: Any = nnx.Param
    needs_key: bool = False  # a PRNG key per step even without model dropout (LoRA dropout)

    def build(self, model_cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
        return Transformer(model_cfg, rngs=rngs)

    def batch_spec(self, cfg) -> dict[str, tuple[tuple[int, ...], Any]]:
        raise NotImplementedError

    def loss(self, model: nnx.Module, batch: dict, key: jax.Array | None) -> LossSums:
        raise NotImplementedError


def lm_loss_sums(model: Transformer, batch: dict, key: jax.Array | None) -> tuple:
    """Summed token cross-entropy (nats), summed weights, and the MoE aux of the forward pass
    averaged over MoE layers (`moe.reduce_layers`; {} for a dense model)."""
    args = (batch["inputs"], batch["positions"], batch["segment_ids"], None, None, key)
    weights = batch["weights"].astype(jnp.float32)
    chunk = model.cfg.loss_chunk
    aux: dict = {}
    if model.cfg.num_experts > 0:
        hidden, _, layer_aux = model.hidden_and_aux(*args, batch.get("prefix"))
        aux = moe.reduce_layers(layer_aux)
    elif chunk > 0:
        hidden, _ = model.hidden(*args, batch.get("prefix"))
    if chunk > 0:
        # Logits one chunk of positions at a time, recomputed in the backward pass.
        matrix, layout = model.head_matrix()
        loss_sum = chunked_cross_entropy(
            hidden, matrix, layout, batch["targets"], weights, chunk, model.cfg.final_logit_softcap
        )
        return loss_sum, jnp.sum(weights), aux
    if model.cfg.num_experts > 0:
        logits = model.logits(hidden)
    else:
        logits, _ = model(*args, batch.get("prefix"))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(losses * weights), jnp.sum(weights), aux


class LanguageModelObjective(Objective):
    """Weighted next-token cross-entropy: pretraining (weights 1 on real tokens), the masked
    objectives (weights on corrupted positions) and SFT (weights on assistant tokens only).
    The optimized value adds the weighted MoE aux losses; the reported loss stays
    cross-entropy."""

    def __init__(self, data_objective: str = "lm"):
        self.features = LM_FEATURES + (("prefix",) if data_objective == "span_corruption" else ())

    def batch_spec(self, cfg) -> dict[str, tuple[tuple[int, ...], Any]]:
        seq = (cfg.data.seq_len,)
        return {k: (seq, jnp.float32 if k == "weights" else jnp.int32) for k in self.features}

    def loss(self, model: Transformer, batch: dict, key: jax.Array | None) -> LossSums:
        loss_sum, weight_sum, aux = lm_loss_sums(model, batch, key)
        objective = loss_sum + weight_sum * moe.aux_penalty(aux, model.cfg)
        # moe/expert_load is a vector [E]; the per-layer load feeds the router-bias update.
        metrics = {f"moe/{n}": v * weight_sum for n, v in aux.items()}
        return LossSums(objective, loss_sum, weight_sum, metrics)
