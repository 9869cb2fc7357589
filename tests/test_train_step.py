"""Optimizer and train step: accumulation equals the large batch, the spike/NaN guard, decay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import sharding
from lm.config import get_config
from lm.models.transformer import ModelConfig
from lm.training.optimizer import decay_mask, lr_schedule
from lm.training.train_step import Trainer

VOCAB = 64
BASE = [
    "--config.model.d_model=32",
    "--config.model.d_ff=64",
    "--config.data.seq_len=16",
    "--config.data.batch_size=12",
    "--config.optim.warmup_steps=0",
    "--config.train.steps=10",
    "--config.mesh.data=1",
]


def trainer(*extra):
    cfg = get_config("tiny", [*BASE, *extra])
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    return Trainer(cfg, ModelConfig.from_config(cfg.model, VOCAB), mesh)


def batch(seed=0, rows=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (rows, 17)).astype(np.int32)
    weights = np.ones((rows, 16), np.float32)
    weights[rng.random((rows, 16)) < 0.3] = 0.0  # uneven token counts per micro-batch
    return dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        segment_ids=np.ones((rows, 16), np.int32),
        positions=np.broadcast_to(np.arange(16), (rows, 16)).astype(np.int32),
        weights=weights,
    )


def test_gradient_accumulation_equals_the_large_batch():
    big, acc = trainer(), trainer("--config.optim.grad_accum_steps=4")
    s_big, s_acc = big.init_state(), acc.init_state()
    for i in range(3):
        s_big, m_big = big.train_step(s_big, big.device_batch(batch(i)))
        s_acc, m_acc = acc.train_step(s_acc, acc.device_batch(batch(i)))
        np.testing.assert_allclose(float(m_big["loss"]), float(m_acc["loss"]), rtol=1e-6)
        np.testing.assert_allclose(float(m_big["grad_norm"]), float(m_acc["grad_norm"]), rtol=1e-5)
    # Adam divides by sqrt(v): near-zero gradients (e.g. the q bias) amplify float rounding,
    # so compare against the size of one update (lr = 3e-3), not against 0.
    for a, b in zip(jax.tree.leaves(s_big.params), jax.tree.leaves(s_acc.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def test_a_group_of_steps_in_one_call_equals_the_steps_one_by_one():
    t = trainer()
    one, group = t.init_state(), t.init_state()
    per_step = []
    for i in range(3):
        one, m = t.train_step(one, t.device_batch(batch(i)))
        per_step.append(float(m["loss"]))
    stacked = {k: np.stack([batch(i)[k] for i in range(3)]) for k in batch(0)}
    group, metrics = t.train_steps(group, t.device_batch(stacked))
    assert int(group.step) == int(one.step) == 3
    np.testing.assert_allclose(np.asarray(metrics["loss"]), per_step, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(group.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-5)


def test_steps_are_grouped_only_where_nothing_happens_inside_the_group():
    from lm.data.curriculum import Curriculum
    from lm.training.loop import steps_in_call

    cfg = get_config(
        "tiny",
        [
            "--config.train.steps=100",
            "--config.train.steps_per_call=10",
            "--config.train.log_every=25",
            "--config.train.eval_every=50",
            "--config.train.checkpoint_every=50",
        ],
    )
    flat = Curriculum.from_config(cfg)
    assert steps_in_call(0, cfg, flat) == 10  # logs after step 10: no boundary inside
    assert steps_in_call(20, cfg, flat) == 1  # step 25 (a log step) would fall inside
    assert steps_in_call(25, cfg, flat) == 1  # not a multiple of 10
    assert steps_in_call(30, cfg, flat) == 10
    assert steps_in_call(40, cfg, flat) == 10  # ends exactly on the eval/checkpoint step 50
    assert steps_in_call(95, cfg, flat) == 1
    cfg.train.steps = 95
    assert steps_in_call(90, cfg, flat) == 1  # would run past train.steps
    cfg.train.steps = 100
    cfg.data.curriculum.update(seq_len_start=32, seq_len_warmup_steps=60)  # stages: 0, 20, 40
    warm = Curriculum.from_config(cfg)
    assert [warm.row_len(s) for s in (0, 19, 20, 40)] == [32, 32, 64, 128]
    assert steps_in_call(0, cfg, warm) == 10 and steps_in_call(10, cfg, warm) == 10
    cfg.data.curriculum.seq_len_warmup_steps = 45  # stages: 0, 15, 30: 10-19 changes length
    warm = Curriculum.from_config(cfg)
    assert steps_in_call(10, cfg, warm) == 1 and steps_in_call(30, cfg, warm) == 10
    cfg.train.steps_per_call = 1
    assert steps_in_call(0, cfg, flat) == 1


def test_spike_guard_skips_the_update_and_says_so():
    t = trainer("--config.optim.spike_factor=2.0")
    state = t.init_state()
    state, m = t.train_step(state, t.device_batch(batch(0)))
    assert float(m["skipped"]) == 0.0
    # Pretend the running loss was tiny: the next (normal) loss is a >2x spike.
    before = jax.tree.map(np.asarray, state.params)
    state = state.replace(loss_ema=jnp.float32(0.1))
    state, m = t.train_step(state, t.device_batch(batch(1)))
    assert float(m["skipped"]) == 1.0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    assert int(state.step) == 2 and float(state.loss_ema) == pytest.approx(0.1)


def test_nan_loss_is_skipped():
    t = trainer()
    state = t.init_state()

    def poison(path, x):
        return x.at[0].set(jnp.nan) if "final_norm" in jax.tree_util.keystr(path) else x

    poisoned = jax.tree_util.tree_map_with_path(poison, state.params)
    state = state.replace(params=poisoned)
    before = np.asarray(state.params["blocks"][0]["mlp"]["up"]["kernel"])
    state, m = t.train_step(state, t.device_batch(batch(0)))
    assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
    np.testing.assert_array_equal(before, state.params["blocks"][0]["mlp"]["up"]["kernel"])


def test_weight_decay_only_on_projection_kernels():
    t = trainer("--config.model.use_bias=true")
    mask = decay_mask(t.init_state().params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = sorted(k for k, v in flat.items() if v)
    assert decayed and all("kernel" in k for k in decayed)
    assert "['blocks'][0]['mlp']['up']['kernel']" in "".join(decayed)
    for never in ("bias", "scale", "embedding"):
        assert any(never in k for k in flat) and not any(never in k for k in decayed)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = get_config(
        "tiny",
        [
            "--config.optim.lr=1.0",
            "--config.optim.warmup_steps=10",
            "--config.optim.min_lr_ratio=0.1",
        ],
    )
    for kind in ("cosine", "linear"):
        cfg.optim.schedule = kind
        s = lr_schedule(cfg.optim, 110)
        assert float(s(5)) == pytest.approx(0.5)
        assert float(s(10)) == pytest.approx(1.0)
        assert float(s(60)) < 1.0
        assert float(s(110)) == pytest.approx(0.1, abs=1e-6)


def test_logged_lr_is_the_applied_lr_after_a_skip():
    # b1 = b2 = 0 and no decay or clipping: every Adam update is lr * g / (|g| + eps), so the
    # largest |param delta| of a step is the lr that step applied.
    t = trainer(
        "--config.optim.warmup_steps=5",
        "--config.optim.b1=0",
        "--config.optim.b2=0",
        "--config.optim.weight_decay=0",
        "--config.optim.clip_norm=0",
        "--config.optim.spike_factor=2",
    )
    state = t.init_state()
    state, _ = t.train_step(state, t.device_batch(batch(0)))  # applied: schedule(0) = 0
    state, _ = t.train_step(state, t.device_batch(batch(1)))  # applied: schedule(1)
    forced = state.replace(loss_ema=jnp.asarray(1e-3, jnp.float32))  # any loss is a spike
    state, m = t.train_step(forced, t.device_batch(batch(2)))
    assert float(m["skipped"]) == 1.0
    state = state.replace(loss_ema=jnp.zeros((), jnp.float32))
    before = jax.tree.leaves(state.params)
    before = [np.asarray(x) for x in before]
    state, m = t.train_step(state, t.device_batch(batch(3)))
    assert float(m["skipped"]) == 0.0 and int(state.step) == 4
    applied = max(
        float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(state.params), before)
    )
    sched = lr_schedule(t.cfg.optim, t.cfg.train.steps)
    assert applied == pytest.approx(float(sched(2)), rel=1e-3)  # the 3rd applied update
    assert float(m["lr"]) == pytest.approx(applied, rel=1e-3)
