"""The math of the alignment objectives: log-probs, reward-model, DPO, PPO and GRPO losses.

Every function is pure jnp and is called inside a jitted train step, so nothing branches on a
traced value: masks are float arrays (1 = a response token that counts, 0 = prompt or padding),
and padded positions are removed with `jnp.where` *before* any `exp`, so whatever a padded
position holds cannot overflow into a NaN, in the loss or in its gradient. The losses return
per-example values or sums together with the weight to divide them by; the trainer adds both over
the micro-batches of a gradient-accumulation step and divides once, so a step's loss does not
depend on how its batch was split. Python-level options (`kind`, `token_level`, `reference_free`,
`group_size`) are static arguments.

Shapes: B sequences (or preference pairs), T positions, V vocabulary entries.
The host-side KL controllers at the end are plain Python: they run between steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------------------------
# Log-probabilities


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) at each position [B, T], float32, from logits [B, T, V] (bf16 allowed).

    logit[target] - logsumexp(logits) in float32: the max-shifted logsumexp stays finite for any
    logits, and the [B, T, V] log-softmax is never formed as an array of its own."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def sequence_logps(logps: jax.Array, weights: jax.Array) -> jax.Array:
    """log p(response) [B]: the token log-probs [B, T] summed over the weighted positions."""
    return jnp.sum(jnp.where(weights > 0, logps * weights, 0.0), axis=-1)


# ---------------------------------------------------------------------------------------------
# Preference objectives: reward model and DPO


def bradley_terry_loss(r_chosen: jax.Array, r_rejected: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reward-model loss -log sigmoid(r_c - r_r) [B] and whether the pair is ranked right [B].

    The Bradley-Terry model says P(chosen preferred) = sigmoid(r_c - r_r); the loss is its
    negative log-likelihood (log_sigmoid is computed stably for large margins). `correct` is
    1.0 where r_c > r_r, a float so the trainer can sum it."""
    margin = r_chosen.astype(jnp.float32) - r_rejected.astype(jnp.float32)
    return -jax.nn.log_sigmoid(margin), (margin > 0).astype(jnp.float32)


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array | None,
    ref_rejected: jax.Array | None,
    beta: float | jax.Array,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
) -> dict[str, jax.Array]:
    """Direct Preference Optimization loss per pair [B], with its implicit rewards.

    Inputs are sequence log-probs [B] of the chosen and rejected responses under the policy
    and the frozen reference. With h = (pi_c - pi_r) - (ref_c - ref_r), the DPO loss (Rafailov
    et al. 2023) is -log sigmoid(beta h). Label smoothing eps (conservative DPO) assumes each
    label is flipped with probability eps: -(1 - eps) log sigmoid(beta h) - eps log
    sigmoid(-beta h). `reference_free` sets the reference log-probs to 0 (they may be None).
    The rewards beta (pi - ref), margins and accuracy are metrics, so no gradient flows
    through them."""
    pc, pr = policy_chosen.astype(jnp.float32), policy_rejected.astype(jnp.float32)
    if reference_free:
        rc, rr = jnp.zeros_like(pc), jnp.zeros_like(pr)
    else:
        rc, rr = ref_chosen.astype(jnp.float32), ref_rejected.astype(jnp.float32)
    logits = beta * ((pc - pr) - (rc - rr))
    eps = label_smoothing
    loss = -(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)
    chosen_rewards = jax.lax.stop_gradient(beta * (pc - rc))
    rejected_rewards = jax.lax.stop_gradient(beta * (pr - rr))
    return {
        "loss": loss,
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "margins": chosen_rewards - rejected_rewards,
        "accuracy": (chosen_rewards > rejected_rewards).astype(jnp.float32),
    }


# ---------------------------------------------------------------------------------------------
# RLHF with PPO: the KL to the reference, per-token rewards, advantages, the two losses


def kl_penalty(
    logp: jax.Array, ref_logp: jax.Array, kind: str = "k1", mask: jax.Array | None = None
) -> jax.Array:
    """Per-token estimate [B, T] of KL(policy || reference) from the sampled tokens' log-probs.

    The tokens were sampled from the policy; with d = ref_logp - logp (Schulman, "Approximating
    KL divergence", 2020): k1 = -d (unbiased, can be negative), k2 = d^2 / 2 (biased, >= 0),
    k3 = exp(d) - d - 1 (unbiased and >= 0, since e^x >= 1 + x). Positions where `mask` is 0
    are 0; d is masked before the exp, so padding cannot overflow."""
    d = ref_logp.astype(jnp.float32) - logp.astype(jnp.float32)
    if mask is not None:
        d = jnp.where(mask > 0, d, 0.0)
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return jnp.expm1(d) - d
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def per_token_rewards(
    scores: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: float | jax.Array
) -> jax.Array:
    """PPO rewards [B, T]: -kl_coef * kl on each valid token, plus the sequence's score [B]
    on its last valid token (InstructGPT: the reward model judges the whole response, the KL
    penalty keeps each token close to the reference). A row with no valid token is all 0."""
    valid = mask > 0
    positions = jnp.arange(mask.shape[-1])
    last = jnp.argmax(jnp.where(valid, positions, -1), axis=-1)  # [B]
    at_last = (positions == last[:, None]) & valid  # False everywhere in an empty row
    penalty = jnp.where(valid, -kl_coef * kl, 0.0)
    return penalty + jnp.where(at_last, scores[:, None].astype(jnp.float32), 0.0)


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    gamma: float | jax.Array,
    lam: float | jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation (Schulman et al. 2016): advantages and returns [B, T].

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1}, computed by a
    reverse `lax.scan` over T. The valid positions of a row are one contiguous run (the
    response); the episode ends at its last valid token, so V and A after it are 0. The scan
    carries (V, A) of the next position and resets the carry to 0 at every masked position,
    which handles prompt tokens before the run and padding after it. Returns = A + V (the
    value-function targets). Masked positions get 0 in both. The outputs are targets: compute
    them from rollout data outside the gradient."""
    valid = mask > 0
    rewards = jnp.where(valid, rewards.astype(jnp.float32), 0.0)
    values = jnp.where(valid, values.astype(jnp.float32), 0.0)

    def step(carry, xs):
        next_value, next_adv = carry
        r, v, ok = xs  # [B] each: one position of every row
        adv = r + gamma * next_value - v + gamma * lam * next_adv
        adv = jnp.where(ok, adv, 0.0)
        return (v, adv), adv  # v is already 0 where masked

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, adv_t = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, valid.T), reverse=True)
    advantages = adv_t.T
    return advantages, jnp.where(valid, advantages + values, 0.0)


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """x [B, T] normalized to mean 0 and variance 1 over its valid positions; masked ones are 0.

    Statistics are over all valid tokens of the batch (population variance). shift_mean=False
    adds the mean back, only rescaling (used for rewards, whose sign matters). With no valid
    position the count is clamped to 1 and the output is 0, never NaN."""
    valid = mask > 0
    x = jnp.where(valid, x.astype(jnp.float32), 0.0)
    count = jnp.maximum(jnp.sum(valid), 1)
    mean = jnp.sum(x) / count
    var = jnp.sum(jnp.where(valid, (x - mean) ** 2, 0.0)) / count
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(valid, out, 0.0)


def _clipped_surrogate(
    log_ratio: jax.Array, advantages: jax.Array, clip_eps: float | jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token PPO clipped loss max(-A r, -A clip(r, 1-eps, 1+eps)), whether the clipped term
    is the larger one (then the gradient is 0), and the ratio r = exp(log_ratio)."""
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32), ratio


def ppo_policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float | jax.Array,
) -> dict[str, jax.Array]:
    """PPO's clipped surrogate (Schulman et al. 2017), summed over valid tokens [B, T].

    r = pi(a)/pi_old(a) per token; the loss is max(-A r, -A clip(r, 1-eps, 1+eps)), i.e. the
    negated pessimistic objective min(r A, clip(r) A). Returned as sums with `count` (valid
    tokens): clipfrac_sum counts tokens where the clip was active, approx_kl_sum is the k3
    estimate of KL(old || new), r - 1 - log r (a metric, no gradient)."""
    valid = mask > 0
    log_ratio = jnp.where(valid, logp.astype(jnp.float32) - old_logp.astype(jnp.float32), 0.0)
    loss, clipped, ratio = _clipped_surrogate(log_ratio, advantages.astype(jnp.float32), clip_eps)
    approx_kl = jax.lax.stop_gradient(ratio - 1.0 - log_ratio)
    return {
        "loss_sum": jnp.sum(jnp.where(valid, loss, 0.0)),
        "clipfrac_sum": jnp.sum(jnp.where(valid, clipped, 0.0)),
        "approx_kl_sum": jnp.sum(jnp.where(valid, approx_kl, 0.0)),
        "count": jnp.sum(valid.astype(jnp.float32)),
    }


def ppo_value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    clip: float | jax.Array,
) -> dict[str, jax.Array]:
    """Clipped value loss 0.5 max((v - R)^2, (v_clip - R)^2) summed over valid tokens [B, T].

    v_clip = old + clip(v - old, -c, c) keeps the value head from moving more than c from the
    rollout's values in one update (as in the PPO reference implementation); taking the max
    of the two errors is pessimistic. clipfrac_sum counts tokens where the clipped error won."""
    valid = mask > 0
    v = jnp.where(valid, values.astype(jnp.float32), 0.0)
    old = jnp.where(valid, old_values.astype(jnp.float32), 0.0)
    ret = jnp.where(valid, returns.astype(jnp.float32), 0.0)
    v_clipped = old + jnp.clip(v - old, -clip, clip)
    err, err_clipped = (v - ret) ** 2, (v_clipped - ret) ** 2
    return {
        "loss_sum": jnp.sum(jnp.where(valid, 0.5 * jnp.maximum(err, err_clipped), 0.0)),
        "clipfrac_sum": jnp.sum(jnp.where(valid & (err_clipped > err), 1.0, 0.0)),
    }


# ---------------------------------------------------------------------------------------------
# GRPO: group-relative outcome advantages and the per-token loss


def group_advantages(
    rewards: jax.Array, group_size: int, eps: float = 1e-4, scale: bool = True
) -> jax.Array:
    """GRPO outcome advantages [N*G] from the rewards [N*G] of N prompts x G samples each.

    Each reward minus its group's mean, divided by (group std + eps) (DeepSeekMath, Shao et
    al. 2024; std with Bessel's correction, as torch's default). scale=False skips the
    division, Dr. GRPO (Liu et al. 2025), which removes the bias toward groups with a small
    spread. A group whose rewards are all equal carries no signal and gets exactly 0 (tested
    directly, as the float mean of equal values need not equal them)."""
    groups = rewards.astype(jnp.float32).reshape(-1, group_size)  # [N, G]
    mean = jnp.mean(groups, axis=1, keepdims=True)
    centered = groups - mean
    if scale:
        var = jnp.sum(centered**2, axis=1, keepdims=True) / max(group_size - 1, 1)
        centered = centered / (jnp.sqrt(var) + eps)
    constant = jnp.max(groups, axis=1, keepdims=True) == jnp.min(groups, axis=1, keepdims=True)
    return jnp.where(constant, 0.0, centered).reshape(-1)


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float | jax.Array,
    beta: float | jax.Array,
    token_level: bool = False,
) -> dict[str, jax.Array]:
    """GRPO loss: per token [B, T], the clipped surrogate with its sequence's advantage [B],
    plus beta times the k3 estimate of KL(policy || reference); returned as a sum and weight.

    token_level=False (DeepSeekMath): each sequence's mean over its valid tokens, summed over
    sequences; weight = number of sequences with a valid token. token_level=True (DAPO, Yu et
    al. 2025): summed over all valid tokens, weight = their count, so long responses are not
    down-weighted per token. kl_sum and clipfrac_sum are normalized the same way, so
    x_sum / weight is the mean the loss uses. With old_logp = stop_gradient(logp) (one update
    per rollout) the ratio is 1, yet its gradient is -A per token: the policy gradient."""
    valid = mask > 0
    log_ratio = jnp.where(valid, logp.astype(jnp.float32) - old_logp.astype(jnp.float32), 0.0)
    adv = jnp.broadcast_to(advantages.astype(jnp.float32)[:, None], log_ratio.shape)
    surrogate, clipped, _ = _clipped_surrogate(log_ratio, adv, clip_eps)
    kl = kl_penalty(logp, ref_logp, "k3", mask)
    per_token = {"loss": surrogate + beta * kl, "kl": kl, "clipfrac": clipped}
    per_token = {k: jnp.where(valid, x, 0.0) for k, x in per_token.items()}
    lengths = jnp.sum(valid.astype(jnp.float32), axis=-1)  # [B]
    if token_level:
        sums = {k: jnp.sum(x) for k, x in per_token.items()}
        weight = jnp.sum(lengths)
    else:
        per_seq = jnp.maximum(lengths, 1.0)[:, None]
        sums = {k: jnp.sum(x / per_seq) for k, x in per_token.items()}
        weight = jnp.sum((lengths > 0).astype(jnp.float32))
    return {
        "loss_sum": sums["loss"],
        "weight": weight,
        "kl_sum": jax.lax.stop_gradient(sums["kl"]),
        "clipfrac_sum": sums["clipfrac"],
    }


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers (host side, between steps)


class FixedKLController:
    """A constant KL coefficient; `update` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keeps the coefficient (the same interface as AdaptiveKLController)."""


class AdaptiveKLController:
    """The KL coefficient that steers the measured KL toward `target` (Ziegler et al. 2019).

    After each batch: error = clip(KL / target - 1, -0.2, 0.2) and coef *= 1 + error *
    n_steps / horizon, a proportional controller whose step is bounded, so one noisy batch
    moves the coefficient by at most 20% of n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Raise the coefficient when KL is above target, lower it when below."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
