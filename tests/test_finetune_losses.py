"""lm/finetune/losses.py against references written here in numpy and Python loops.

Each function is jit-compiled once (static options as static arguments), as the train step
uses it; every masked function is also run on an all-zero mask, which must give 0, not NaN.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.finetune import losses as L

token_logps = jax.jit(L.token_logps)
sequence_logps = jax.jit(L.sequence_logps)
bradley_terry = jax.jit(L.bradley_terry_loss)
dpo = jax.jit(L.dpo_loss, static_argnames=("reference_free",))
kl_penalty = jax.jit(L.kl_penalty, static_argnames=("kind",))
per_token_rewards = jax.jit(L.per_token_rewards)
gae = jax.jit(L.gae)
whiten = jax.jit(L.whiten, static_argnames=("shift_mean",))
ppo_policy = jax.jit(L.ppo_policy_loss)
ppo_value = jax.jit(L.ppo_value_loss)
group_advantages = jax.jit(L.group_advantages, static_argnames=("group_size", "scale"))
grpo = jax.jit(L.grpo_loss, static_argnames=("token_level",))


def softplus(x):
    """-log sigmoid(-x) in float64, the reference for every log-sigmoid."""
    return np.logaddexp(0.0, np.asarray(x, np.float64))


def all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


# --- log-probs -------------------------------------------------------------------------------


def test_token_and_sequence_logps_match_numpy_for_bf16_and_huge_logits():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 7)) * 3, jnp.bfloat16)
    targets = rng.integers(0, 7, size=(2, 3))
    x = np.asarray(logits.astype(jnp.float32), np.float64)  # the values bf16 actually holds
    m = x.max(-1, keepdims=True)
    ref = x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))
    ref = np.take_along_axis(ref, targets[..., None], -1)[..., 0]
    got = token_logps(logits, jnp.asarray(targets))
    assert got.dtype == jnp.float32 and got.shape == (2, 3)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    weights = np.array([[1, 1, 0], [0, 1, 1]], np.float32)
    np.testing.assert_allclose(
        sequence_logps(got, jnp.asarray(weights)), (ref * weights).sum(-1), rtol=1e-5
    )
    assert float(sequence_logps(got, jnp.zeros((2, 3)))[0]) == 0.0

    # Logits far beyond exp's range: the target 1e4 above the rest has log-prob ~0.
    huge = jnp.array([[[1e4, 0.0, -1e4]]], jnp.float32)
    out = token_logps(huge, jnp.array([[0]]))
    assert np.isfinite(out).all() and abs(float(out[0, 0])) < 1e-6
    assert float(token_logps(huge, jnp.array([[1]]))[0, 0]) == pytest.approx(-1e4)


# --- preference objectives -------------------------------------------------------------------


def test_bradley_terry_matches_numpy():
    rc = np.array([1.0, -2.0, 0.5, 40.0, 3.0], np.float32)
    rr = np.array([0.0, 1.0, 0.5, -40.0, 3.5], np.float32)
    loss, correct = bradley_terry(jnp.asarray(rc), jnp.asarray(rr))
    np.testing.assert_allclose(loss, softplus(-(rc - rr)), rtol=1e-6, atol=1e-30)
    np.testing.assert_array_equal(correct, (rc > rr).astype(np.float32))  # the tie is wrong


def test_dpo_against_hand_computed_values():
    # pi_c - pi_r = 2, ref_c - ref_r = 0.5: h = 1.5, beta h = 0.15.
    pc, pr, rc, rr = (jnp.array([v]) for v in (-10.0, -12.0, -11.0, -11.5))
    out = dpo(pc, pr, rc, rr, 0.1)
    assert float(out["loss"][0]) == pytest.approx(math.log1p(math.exp(-0.15)), rel=1e-6)
    assert float(out["loss"][0]) == pytest.approx(0.62096, abs=1e-5)
    assert float(out["chosen_rewards"][0]) == pytest.approx(0.1 * (-10.0 + 11.0), rel=1e-5)
    assert float(out["rejected_rewards"][0]) == pytest.approx(0.1 * (-12.0 + 11.5), rel=1e-5)
    assert float(out["margins"][0]) == pytest.approx(0.15, rel=1e-5)
    assert float(out["accuracy"][0]) == 1.0

    smoothed = dpo(pc, pr, rc, rr, 0.1, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-0.15)) + 0.1 * math.log1p(math.exp(0.15))
    assert float(smoothed["loss"][0]) == pytest.approx(expected, rel=1e-6)

    # Reference-free: h = pi_c - pi_r = 2; the rewards are beta * pi.
    free = dpo(pc, pr, None, None, 0.1, reference_free=True)
    assert float(free["loss"][0]) == pytest.approx(math.log1p(math.exp(-0.2)), rel=1e-6)
    assert float(free["chosen_rewards"][0]) == pytest.approx(-1.0, rel=1e-6)


def test_dpo_batch_matches_numpy_and_its_gradient_prefers_chosen():
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(size=6).astype(np.float32) * 5 for _ in range(4))
    beta, eps = 0.3, 0.2
    h = beta * ((pc - pr) - (rc - rr))
    ref = (1 - eps) * softplus(-h) + eps * softplus(h)
    out = dpo(*(jnp.asarray(a) for a in (pc, pr, rc, rr)), beta, label_smoothing=eps)
    np.testing.assert_allclose(out["loss"], ref, rtol=1e-5)
    np.testing.assert_array_equal(out["accuracy"], (pc - rc > pr - rr).astype(np.float32))

    total = lambda a, b: jnp.sum(L.dpo_loss(a, b, rc, rr, beta)["loss"])
    grad_c, grad_r = jax.jit(jax.grad(total, (0, 1)))(pc, pr)
    assert np.all(grad_c < 0) and np.all(grad_r > 0)  # descent raises chosen, lowers rejected


# --- PPO pieces ------------------------------------------------------------------------------


def test_kl_estimators():
    rng = np.random.default_rng(2)
    logp, ref = (rng.normal(size=(3, 8)).astype(np.float32) for _ in range(2))
    d = ref.astype(np.float64) - logp
    np.testing.assert_allclose(kl_penalty(logp, ref, kind="k1"), -d, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kl_penalty(logp, ref, kind="k2"), 0.5 * d * d, rtol=1e-5)
    k3 = kl_penalty(logp, ref, kind="k3")
    np.testing.assert_allclose(k3, np.exp(d) - d - 1, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(k3) >= 0)
    assert np.all(np.asarray(kl_penalty(logp, logp, kind="k3")) == 0)
    with pytest.raises(ValueError, match="k4"):
        L.kl_penalty(logp, ref, kind="k4")
    # The mask zeroes padding before the exp: a huge padded gap stays finite.
    pad = kl_penalty(
        jnp.array([[-1.0, -500.0]]), jnp.array([[-1.5, 0.0]]), "k3", jnp.array([[1, 0]])
    )
    assert np.isfinite(pad).all() and float(pad[0, 1]) == 0.0

    # Unbiasedness: over samples from p, mean k1 and mean k3 approach KL(p || q).
    p, q = np.array([0.5, 0.2, 0.2, 0.1]), np.array([0.25, 0.25, 0.25, 0.25])
    x = np.random.default_rng(3).choice(4, size=200_000, p=p)
    lp, lq = np.log(p)[x][None].astype(np.float32), np.log(q)[x][None].astype(np.float32)
    exact = float(np.sum(p * np.log(p / q)))
    for kind in ("k1", "k3"):
        assert float(jnp.mean(kl_penalty(lp, lq, kind=kind))) == pytest.approx(exact, rel=0.03)


def test_per_token_rewards_puts_the_score_on_the_last_valid_token():
    kl = np.array([[0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 9.0, 9.0], [5.0, 5.0, 5.0, 5.0]], np.float32)
    mask = np.array([[0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], np.float32)
    out = per_token_rewards(jnp.array([10.0, 20.0, 30.0]), kl, mask, 0.5)
    expected = np.array(
        [[0.0, -0.1, -0.15, 10.0 - 0.2], [-0.5, 20.0 - 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    )
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def gae_reference(rewards, values, lengths, gamma, lam):
    """GAE by a backward Python loop over each row's first `length` positions."""
    adv, ret = np.zeros(rewards.shape), np.zeros(rewards.shape)
    for b, n in enumerate(lengths):
        next_adv = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            adv[b, t], ret[b, t] = next_adv, next_adv + values[b, t]
    return adv, ret


def test_gae_matches_a_backward_loop_with_padding():
    rewards = np.array([[0.0, 0.0, 0.5, 0.0, 1.0], [0.2, 0.0, 2.0, 7.0, 7.0]], np.float32)
    # Row 1 has 3 valid tokens; its padding holds large values that must not leak in.
    values = np.array([[0.1, 0.3, -0.2, 0.4, 0.6], [1.0, 0.5, 0.2, 100.0, 100.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.float32)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, [5, 3], gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-6)
    # The episode ends at the last token: its advantage is r - V.
    assert float(adv[1, 2]) == pytest.approx(2.0 - 0.2)

    # gamma = lam = 1: the advantage is the sum of remaining rewards minus the value.
    adv1, _ = gae(rewards, values, mask, 1.0, 1.0)
    np.testing.assert_allclose(adv1[0], np.cumsum(rewards[0][::-1])[::-1] - values[0], rtol=1e-5)

    zero_adv, zero_ret = gae(rewards, values, np.zeros_like(mask), gamma, lam)
    assert np.all(np.asarray(zero_adv) == 0) and np.all(np.asarray(zero_ret) == 0)


def test_whiten_over_valid_positions():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 6)).astype(np.float32) * 3 + 2
    mask = (rng.random((3, 6)) > 0.3).astype(np.float32)
    v = x[mask > 0].astype(np.float64)
    out = np.asarray(whiten(x, mask))
    np.testing.assert_allclose(out[mask > 0], (v - v.mean()) / v.std(), rtol=1e-4, atol=1e-5)
    assert np.all(out[mask == 0] == 0)
    kept = np.asarray(whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(kept[mask > 0], (v - v.mean()) / v.std() + v.mean(), rtol=1e-4)
    assert np.all(np.asarray(whiten(x, np.zeros_like(mask))) == 0)


def surrogate_reference(logp, old_logp, adv, mask, eps):
    """The paper's form -min(r A, clip(r) A) token by token, and the count of clipped tokens."""
    loss = clipped = 0.0
    for lp, olp, a, m in zip(logp.ravel(), old_logp.ravel(), adv.ravel(), mask.ravel()):
        if not m:
            continue
        r = math.exp(float(lp) - float(olp))
        plain, clip = r * a, min(max(r, 1 - eps), 1 + eps) * a
        loss -= min(plain, clip)
        clipped += clip < plain
    return loss, clipped


def test_ppo_policy_loss_with_and_without_clipping():
    ratios = np.array([[1.5, 0.5, 0.5, 1.5, 1.1, 1.0]])
    adv = np.array([[2.0, 2.0, -1.0, -1.0, 3.0, 1.0]], np.float32)
    # A>0, r>1+eps: clipped. A>0, r<1-eps: not. A<0, r<1-eps: clipped. A<0, r>1+eps: not.
    # r inside the range: not. The last token is padding with a log-ratio that overflows exp.
    old = np.full((1, 6), -2.0, np.float32)
    logp = (old + np.log(ratios)).astype(np.float32)
    logp[0, 5] = 1000.0
    mask = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
    out = ppo_policy(logp, old, adv, mask, 0.2)
    expected = -(1.2 * 2.0) - 0.5 * 2.0 + 0.8 * 1.0 + 1.5 * 1.0 - 1.1 * 3.0
    assert float(out["loss_sum"]) == pytest.approx(expected, rel=1e-5)
    assert float(out["clipfrac_sum"]) == 2.0 and float(out["count"]) == 5.0
    r = ratios[0, :5]
    assert float(out["approx_kl_sum"]) == pytest.approx(np.sum(r - 1 - np.log(r)), rel=1e-4)
    policy_grad = jax.jit(
        jax.grad(lambda lp: L.ppo_policy_loss(lp, old, adv, mask, 0.2)["loss_sum"])
    )
    assert all_finite(policy_grad(logp))

    rng = np.random.default_rng(5)
    logp, old = (rng.normal(size=(4, 9)).astype(np.float32) * 0.3 for _ in range(2))
    adv = rng.normal(size=(4, 9)).astype(np.float32)
    mask = (rng.random((4, 9)) > 0.2).astype(np.float32)
    out = ppo_policy(logp, old, adv, mask, 0.2)
    ref_loss, ref_clipped = surrogate_reference(logp, old, adv, mask, 0.2)
    assert float(out["loss_sum"]) == pytest.approx(ref_loss, rel=1e-5)
    assert float(out["clipfrac_sum"]) == ref_clipped > 0
    assert all_finite(ppo_policy(logp, old, adv, np.zeros_like(mask), 0.2))
    assert float(ppo_policy(logp, old, adv, np.zeros_like(mask), 0.2)["loss_sum"]) == 0.0


def test_ppo_value_loss_matches_a_loop():
    rng = np.random.default_rng(6)
    values, old, returns = (rng.normal(size=(3, 7)).astype(np.float32) for _ in range(3))
    mask = (rng.random((3, 7)) > 0.25).astype(np.float32)
    c = 0.2
    loss = clipped = 0.0
    for v, o, ret, m in zip(values.ravel(), old.ravel(), returns.ravel(), mask.ravel()):
        if m:
            vc = o + min(max(v - o, -c), c)
            loss += 0.5 * max((v - ret) ** 2, (vc - ret) ** 2)
            clipped += (vc - ret) ** 2 > (v - ret) ** 2
    out = ppo_value(values, old, returns, mask, c)
    assert float(out["loss_sum"]) == pytest.approx(loss, rel=1e-5)
    assert float(out["clipfrac_sum"]) == clipped > 0
    assert float(ppo_value(values, old, returns, np.zeros_like(mask), c)["loss_sum"]) == 0.0


def test_kl_controllers():
    ctl = L.AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=256)  # error 1.0, clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 256 / 10_000)) and ctl.value > 0.2
    before = ctl.value
    ctl.update(current_kl=5.4, n_steps=256)  # error -0.1, inside the clip
    assert ctl.value == pytest.approx(before * (1 - 0.1 * 256 / 10_000)) and ctl.value < before
    before = ctl.value
    ctl.update(current_kl=6.0, n_steps=256)
    assert ctl.value == pytest.approx(before)
    fixed = L.FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


# --- GRPO ------------------------------------------------------------------------------------


def test_group_advantages_hand_case():
    rewards = np.array([1, 0, 0, 0, 0.3, 0.3, 0.3, 0.3, 2, 4, 6, 8], np.float32)
    out = np.asarray(group_advantages(rewards, group_size=4))
    std = np.sqrt(1 / 4)  # group [1, 0, 0, 0]: mean 1/4, sample variance (3/16 + 3/16) * 4 / 3
    np.testing.assert_allclose(out[:4], (rewards[:4] - 0.25) / (std + 1e-4), rtol=1e-5)
    assert np.all(out[4:8] == 0.0)  # all equal: exactly 0, although 0.3 is not exact in binary
    s = np.std([2, 4, 6, 8], ddof=1)
    np.testing.assert_allclose(out[8:], (rewards[8:] - 5) / (s + 1e-4), rtol=1e-5)

    raw = np.asarray(group_advantages(rewards, group_size=4, scale=False))
    np.testing.assert_allclose(raw[:4], [0.75, -0.25, -0.25, -0.25], rtol=1e-6)
    assert np.all(raw[4:8] == 0.0)
    np.testing.assert_allclose(raw[8:], [-3, -1, 1, 3], rtol=1e-6)
    assert np.all(np.asarray(group_advantages(rewards, group_size=1)) == 0.0)
    # Three copies of 0.1 average to 0.1 - 7e-9 in float32; the group must still give 0.
    thirds = np.asarray(group_advantages(np.array([0.1, 0.1, 0.1, 1, 0, 0], np.float32), 3))
    assert np.all(thirds[:3] == 0.0) and thirds[3] > 0


def grpo_reference(logp, old, ref, adv, mask, eps, beta, token_level):
    """Per-token (surrogate + beta k3), the k3 and the clip indicator, each averaged per sequence
    or summed over tokens; and the weight (sequences with a valid token, or tokens)."""
    sums, seqs, tokens = np.zeros(3), 0, 0
    for b in range(logp.shape[0]):
        row = []
        for t in range(logp.shape[1]):
            if mask[b, t]:
                r = math.exp(float(logp[b, t]) - float(old[b, t]))
                plain, clip = r * adv[b], min(max(r, 1 - eps), 1 + eps) * adv[b]
                d = float(ref[b, t]) - float(logp[b, t])
                k3 = math.exp(d) - d - 1
                row.append((-min(plain, clip) + beta * k3, k3, clip < plain))
        if row:
            row = np.array(row, np.float64)
            sums += row.sum(0) if token_level else row.mean(0)
            seqs, tokens = seqs + 1, tokens + len(row)
    return sums, tokens if token_level else seqs


@pytest.mark.parametrize("token_level", [False, True])
def test_grpo_loss_matches_a_loop(token_level):
    rng = np.random.default_rng(7)
    logp, old, ref = (rng.normal(size=(4, 6)).astype(np.float32) * 0.4 - 1 for _ in range(3))
    adv = rng.normal(size=4).astype(np.float32)
    mask = np.array(
        [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]]
    )
    mask = mask.astype(np.float32)
    out = grpo(logp, old, ref, adv, mask, 0.2, 0.04, token_level=token_level)
    (loss, kl, clipfrac), weight = grpo_reference(logp, old, ref, adv, mask, 0.2, 0.04, token_level)
    assert float(out["loss_sum"]) == pytest.approx(loss, rel=1e-5)
    assert float(out["kl_sum"]) == pytest.approx(kl, rel=1e-5)
    assert float(out["clipfrac_sum"]) == pytest.approx(clipfrac, rel=1e-6) and clipfrac > 0
    assert float(out["weight"]) == weight
    empty = grpo(logp, old, ref, adv, np.zeros_like(mask), 0.2, 0.04, token_level=token_level)
    assert all_finite(empty) and float(empty["loss_sum"]) == 0 and float(empty["weight"]) == 0


def test_grpo_gradient_at_ratio_one_is_the_policy_gradient():
    logp = jnp.array([[-1.0, -2.0, -0.5, -3.0], [-0.7, -0.2, -1.5, -9.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv = jnp.array([0.6, -1.5])

    def loss(lp, ref, adv, beta, token_level):
        out = L.grpo_loss(lp, jax.lax.stop_gradient(lp), ref, adv, mask, 0.2, beta, token_level)
        return out["loss_sum"]

    grad = jax.jit(jax.grad(loss), static_argnums=4)
    # Ratio 1 and beta = 0: -A / len per valid token, or -A per token at token level.
    expected = -np.asarray(adv)[:, None] * np.asarray(mask)
    np.testing.assert_allclose(grad(logp, logp, adv, 0.0, False), expected / [[3.0], [2.0]])
    np.testing.assert_allclose(grad(logp, logp, adv, 0.0, True), expected)

    # The KL term alone (A = 0): descent moves logp by -grad, toward ref_logp.
    ref = logp + jnp.array([[0.5, -0.5, 0.0, 1.0], [-0.3, 0.3, 1.0, 1.0]])
    kl_grad = np.asarray(grad(logp, ref, jnp.zeros(2), 1.0, False))
    assert np.all(np.sign(-kl_grad) == np.sign(np.asarray(ref - logp) * np.asarray(mask)))
