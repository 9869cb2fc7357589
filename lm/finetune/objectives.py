"""The fine-tuning objectives plugged into the one trainer (lm/training/train_step.py).

SFT and continued pretraining are the language-model objective (SFT rows weight assistant
tokens only). This module adds the reward model (Bradley-Terry), DPO, GRPO and PPO, and LoRA
for any of them. Every batch feature has the batch as its leading axis; a preference batch is
the pair's two rows side by side (`chosen_*`, `rejected_*`), an RL batch is prompt+completion
rows whose weights mark the completion, with the rollout's per-token old / reference
log-probs (computed once per rollout, outside the step) and advantages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lm.finetune import losses
from lm.finetune.heads import PolicyWithValue, RewardModel
from lm.finetune.lora import add_lora
from lm.models.layers.linear import lora_dropout_key
from lm.models.transformer import ModelConfig, Transformer
from lm.training.objectives import LanguageModelObjective, LossSums, Objective

METHODS = ("sft", "lm", "rm", "dpo", "grpo", "ppo")
ROW = ("inputs", "targets", "segment_ids", "positions", "weights")


def _row_spec(seq_len: int, prefix: str = "") -> dict:
    return {f"{prefix}{k}": ((seq_len,), jnp.float32 if k == "weights" else jnp.int32) for k in ROW}


def _rows(batch: dict, prefix: str) -> dict:
    return {k: batch[f"{prefix}{k}"] for k in ROW}


def _valid_pairs(batch: dict) -> jax.Array:
    """[batch] 1.0 for a real pair, 0.0 for a padding row (no weighted position)."""
    return (jnp.sum(batch["chosen_weights"], axis=1) > 0).astype(jnp.float32)


def _pair_rows(batch: dict) -> dict:
    """The chosen rows then the rejected rows, as one [2 * batch, seq] batch (one forward)."""
    return {k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]]) for k in ROW}


def sequence_logps(model: Transformer, rows: dict, key: jax.Array | None = None) -> tuple:
    """(per-token log-probs [batch, seq] of the targets, summed over weighted positions [batch])."""
    logits, _ = model(rows["inputs"], rows["positions"], rows["segment_ids"], dropout_key=key)
    token = losses.token_logps(logits, rows["targets"])
    return token, losses.sequence_logps(token, rows["weights"].astype(jnp.float32))


class WithLoRA(Objective):
    """Any objective with LoRA adapters: only the adapters (and a scalar head, if the model has
    one) train; the base params are frozen. Dropout on the adapters' inputs draws from the
    step's key through `lora_dropout_key`."""

    def __init__(self, inner: Objective, lora_cfg):
        self.inner, self.lora_cfg = inner, lora_cfg
        self.trainable = nnx.Any(
            nnx.LoRAParam, nnx.PathContains("score"), nnx.PathContains("value")
        )
        self.needs_key = inner.needs_key or lora_cfg.dropout > 0
        self.paths: list[str] = []

    def build(self, model_cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
        model = self.inner.build(model_cfg, rngs)
        self.paths = add_lora(model, self.lora_cfg, rngs)
        return model

    def batch_spec(self, cfg) -> dict:
        return self.inner.batch_spec(cfg)

    def loss(self, model, batch: dict, key: jax.Array | None) -> LossSums:
        # A key of its own for the adapters' dropout, apart from the model's residual dropout.
        lora_key = None if key is None else jax.random.fold_in(key, 0x10A)
        with lora_dropout_key(lora_key):
            return self.inner.loss(model, batch, key)


class RewardObjective(Objective):
    """Bradley-Terry on preference pairs: -log sigmoid(r(chosen) - r(rejected)); weight = pairs."""

    def build(self, model_cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
        return RewardModel(model_cfg, rngs=rngs)

    def batch_spec(self, cfg) -> dict:
        return {
            **_row_spec(cfg.data.seq_len, "chosen_"),
            **_row_spec(cfg.data.seq_len, "rejected_"),
        }

    def loss(self, model: RewardModel, batch: dict, key: jax.Array | None) -> LossSums:
        scores = model(_pair_rows(batch))
        chosen, rejected = jnp.split(scores, 2)
        loss, correct = losses.bradley_terry_loss(chosen, rejected)
        valid = _valid_pairs(batch)
        total = jnp.sum(loss * valid)
        metrics = {
            "accuracy": jnp.sum(correct * valid),
            "rewards/chosen": jnp.sum(chosen * valid),
            "rewards/rejected": jnp.sum(rejected * valid),
            "rewards/margin": jnp.sum((chosen - rejected) * valid),
        }
        return LossSums(total, total, jnp.sum(valid), metrics)


class DPOObjective(Objective):
    """DPO (Rafailov et al. 2023) with the reference's sequence log-probs in the batch: they are
    computed once, before training, by `reference_logps` (lm/finetune/run.py)."""

    def __init__(self, dpo_cfg):
        self.beta, self.smoothing = dpo_cfg.beta, dpo_cfg.label_smoothing
        self.reference_free = dpo_cfg.reference_free
        # RPO (Pang et al. 2024): plus this times the chosen answer's per-token NLL, which
        # keeps the policy generating the chosen answers while it separates the pair.
        self.nll_weight = dpo_cfg.get("nll_weight", 0.0)

    def batch_spec(self, cfg) -> dict:
        scalar = ((), jnp.float32)
        return {
            **_row_spec(cfg.data.seq_len, "chosen_"),
            **_row_spec(cfg.data.seq_len, "rejected_"),
            "ref_chosen_logps": scalar,
            "ref_rejected_logps": scalar,
        }

    def loss(self, model: Transformer, batch: dict, key: jax.Array | None) -> LossSums:
        _, logps = sequence_logps(model, _pair_rows(batch), key)
        chosen, rejected = jnp.split(logps, 2)
        out = losses.dpo_loss(
            chosen,
            rejected,
            batch["ref_chosen_logps"],
            batch["ref_rejected_logps"],
            self.beta,
            self.smoothing,
            self.reference_free,
        )
        valid = _valid_pairs(batch)
        total = jnp.sum(out["loss"] * valid)
        objective = total
        if self.nll_weight:
            tokens = jnp.maximum(jnp.sum(batch["chosen_weights"], axis=1), 1.0)
            objective = objective + self.nll_weight * jnp.sum(-chosen / tokens * valid)
        metrics = {
            "rewards/chosen": jnp.sum(out["chosen_rewards"] * valid),
            "rewards/rejected": jnp.sum(out["rejected_rewards"] * valid),
            "rewards/margin": jnp.sum(out["margins"] * valid),
            "rewards/accuracy": jnp.sum(out["accuracy"] * valid),
            # The policy's own ranking, reference aside: what a sampler would prefer.
            "preference_accuracy": jnp.sum((chosen > rejected) * valid),
            "logps/chosen": jnp.sum(chosen * valid),
            "logps/rejected": jnp.sum(rejected * valid),
        }
        return LossSums(objective, total, jnp.sum(valid), metrics)


def _rl_spec(cfg, extra: tuple[str, ...], per_sequence: tuple[str, ...] = ()) -> dict:
    seq = (cfg.data.seq_len,)
    spec = _row_spec(cfg.data.seq_len)
    spec.update({k: (seq, jnp.float32) for k in extra})
    spec.update({k: ((), jnp.float32) for k in per_sequence})
    return spec


class GRPOObjective(Objective):
    """GRPO (Shao et al. 2024): the clipped surrogate with group-normalized sequence advantages
    and beta times the k3 KL to the reference, per token."""

    def __init__(self, rl_cfg):
        self.clip, self.beta = rl_cfg.clip_eps, rl_cfg.kl_beta

    def batch_spec(self, cfg) -> dict:
        return _rl_spec(cfg, ("old_logps", "ref_logps"), ("advantages",))

    def loss(self, model: Transformer, batch: dict, key: jax.Array | None) -> LossSums:
        logps, _ = sequence_logps(model, _rows(batch, ""), key)
        mask = batch["weights"].astype(jnp.float32)
        out = losses.grpo_loss(
            logps,
            batch["old_logps"],
            batch["ref_logps"],
            batch["advantages"],
            mask,
            self.clip,
            self.beta,
        )
        metrics = {"kl": out["kl_sum"], "clipfrac": out["clipfrac_sum"]}
        return LossSums(out["loss_sum"], out["loss_sum"], out["weight"], metrics)


class PPOObjective(Objective):
    """PPO (InstructGPT-style): clipped policy loss on whitened GAE advantages plus the clipped
    value loss of the value head, per valid token."""

    def __init__(self, rl_cfg):
        self.clip, self.value_clip, self.value_coef = (
            rl_cfg.clip_eps,
            rl_cfg.value_clip,
            rl_cfg.value_coef,
        )

    def build(self, model_cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
        return PolicyWithValue(model_cfg, rngs=rngs)

    def batch_spec(self, cfg) -> dict:
        return _rl_spec(cfg, ("old_logps", "old_values", "advantages", "returns"))

    def loss(self, model: PolicyWithValue, batch: dict, key: jax.Array | None) -> LossSums:
        logits, values = model(batch, key)
        logps = losses.token_logps(logits, batch["targets"])
        mask = batch["weights"].astype(jnp.float32)
        policy = losses.ppo_policy_loss(
            logps, batch["old_logps"], batch["advantages"], mask, self.clip
        )
        value = losses.ppo_value_loss(
            values, batch["old_values"], batch["returns"], mask, self.value_clip
        )
        total = policy["loss_sum"] + self.value_coef * value["loss_sum"]
        metrics = {
            "policy_loss": policy["loss_sum"],
            "value_loss": value["loss_sum"],
            "clipfrac": policy["clipfrac_sum"],
            "approx_kl": policy["approx_kl_sum"],
        }
        return LossSums(total, policy["loss_sum"], jnp.sum(mask), metrics)


def make_objective(cfg) -> Objective:
    """The objective of `finetune.method`, with LoRA when `finetune.lora.rank` > 0."""
    method = cfg.finetune.method
    if method in ("sft", "lm"):
        objective: Objective = LanguageModelObjective("lm")
    elif method == "rm":
        objective = RewardObjective()
    elif method == "dpo":
        objective = DPOObjective(cfg.finetune.dpo)
    elif method == "grpo":
        objective = GRPOObjective(cfg.finetune.rl)
    elif method == "ppo":
        objective = PPOObjective(cfg.finetune.rl)
    else:
        from lm.errors import ConfigError

        raise ConfigError(f"--config.finetune.method must be one of {METHODS}, got {method!r}")
    if cfg.finetune.lora.rank > 0:
        objective = WithLoRA(objective, cfg.finetune.lora)
    return objective
