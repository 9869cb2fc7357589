"""The trained model as generation and scoring see it, whatever the objective wraps around it.

`initial_params` loads a base run's weights into the objective's model (a plain Transformer, a
reward model or a PPO policy with a value head, with or without LoRA adapters); `Policy` gives
back the plain language model's params (adapters merged, heads left out) for the generation
engine, and the per-token log-probs (and values) of rows for RL.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.finetune import losses
from lm.finetune.lora import merge_lora
from lm.finetune.objectives import sequence_logps
from lm.training.train_step import Trainer, abstract_model


def initial_params(trainer: Trainer, base_params: nnx.State) -> tuple[nnx.State, Any]:
    """(trainable, frozen) params of the objective's model with the base's weights loaded: the
    language model's params are the base's; heads and adapters keep their fresh init."""

    def build(base_params):
        model = trainer.build_model(nnx.Rngs(trainer.cfg.seed))
        lm = model.lm if hasattr(model, "lm") else model
        nnx.update(lm, base_params)
        if trainer.abstract_frozen is None:
            return nnx.state(model, nnx.Param), None
        _, trainable, frozen = nnx.split(model, trainer.objective.trainable, nnx.Param)
        return trainable, frozen

    out_shardings = (trainer.state_shardings.params, trainer.frozen_shardings)
    return jax.jit(build, out_shardings=out_shardings)(base_params)


class Policy:
    """The pieces of the trained model generation and scoring need: the language model's plain
    graphdef, its current (merged, for LoRA) params, and jitted per-token log-probs (and values,
    for PPO's value head)."""

    def __init__(self, trainer, model_cfg):
        self.trainer = trainer
        self.lm_graphdef, _ = abstract_model(model_cfg)
        self.lora = trainer.abstract_frozen is not None

        def outputs(params, frozen, rows):
            model = trainer.merge(params, frozen)
            if hasattr(model, "value"):
                logits, values = model(rows)
                return losses.token_logps(logits, rows["targets"]), values
            logps = sequence_logps(model, rows)[0]
            return logps, jnp.zeros(rows["targets"].shape, jnp.float32)

        self._outputs = jax.jit(outputs)

        def lm_params(params, frozen):
            model = trainer.merge(params, frozen)
            if self.lora:
                # An int base (QLoRA) is requantized, so the layout stays the int model's.
                merge_lora(model, requantize=model_cfg.weight_bits > 0)
            lm = model.lm if hasattr(model, "lm") else model
            return nnx.state(lm, nnx.Param)

        self._lm_params = jax.jit(lm_params)

    def lm_params(self, params) -> nnx.State:
        return self._lm_params(params, self.trainer.frozen)

    def outputs(self, params, rows: dict) -> tuple[np.ndarray, np.ndarray]:
        logps, values = self._outputs(params, self.trainer.frozen, rows)
        return np.asarray(logps), np.asarray(values)
