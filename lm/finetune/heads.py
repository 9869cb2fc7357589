"""Transformers with a scalar head: the reward model and the PPO policy's value head.

Both keep the language model as the submodule `lm`, so its params are a pretrained run's params
under the key "lm" (loaded as they are), and the head is one `Dense` [embed] -> [1] on the
final-normed hidden states.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lm.models.layers.linear import Dense
from lm.models.transformer import ModelConfig, Transformer


def _head(cfg: ModelConfig, rngs: nnx.Rngs) -> Dense:
    return Dense(
        (cfg.d_model,),
        (1,),
        ("embed", None),
        rngs=rngs,
        use_bias=True,
        init_std=1.0 / cfg.d_model**0.5 * 0.1,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
    )


def last_weighted_index(weights: jax.Array) -> jax.Array:
    """[batch, seq] weights -> [batch] index of each row's last position with weight > 0
    (0 for a row with none)."""
    positions = jnp.arange(weights.shape[1])[None, :]
    return jnp.max(jnp.where(weights > 0, positions, 0), axis=1)


class RewardModel(nnx.Module):
    """r(prompt, completion): the head on the hidden state that predicts the completion's last
    token (its end-of-turn token), as in InstructGPT's reward model."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.lm = Transformer(cfg, rngs=rngs)
        self.score = _head(cfg, rngs)

    def __call__(self, batch: dict, prefix: str = "") -> jax.Array:
        """Scores [batch] of the rows `{prefix}inputs` etc. (weights mark the completion)."""
        hidden, _ = self.lm.hidden(
            batch[f"{prefix}inputs"], batch[f"{prefix}positions"], batch[f"{prefix}segment_ids"]
        )
        last = last_weighted_index(batch[f"{prefix}weights"])
        picked = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [batch, embed]
        return self.score(picked)[:, 0].astype(jnp.float32)


class PolicyWithValue(nnx.Module):
    """The PPO policy: the language model and a value head V(s_t) on every position."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.lm = Transformer(cfg, rngs=rngs)
        self.value = _head(cfg, rngs)

    def __call__(self, batch: dict, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(logits [batch, seq, vocab] float32, values [batch, seq] float32)."""
        hidden, _ = self.lm.hidden(
            batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=key
        )
        values = self.value(hidden)[..., 0].astype(jnp.float32)
        return self.lm.logits(hidden), values
