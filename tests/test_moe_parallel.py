"""Mixture of experts on 8 fake CPU devices: the same losses on every mesh (data, fsdp,
expert parallel), expert weights sharded on `expert`, and tokens moved by all-to-all.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the Makefile sets it).
"""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lm import sharding
from lm.config import get_config
from lm.models.transformer import ModelConfig
from lm.training.train_step import Trainer

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

VOCAB = 128
STEPS = 3
SMALL = [
    "--config.model.d_model=32",
    "--config.model.num_heads=2",
    "--config.model.num_layers=2",
    "--config.model.moe_d_ff=16",
    "--config.model.dtype=float32",
    "--config.model.grouped_matmul=ragged_dot",
    "--config.data.seq_len=16",
    "--config.data.batch_size=8",
    "--config.optim.warmup_steps=1",
    f"--config.train.steps={STEPS}",
]
# (data, fsdp, expert) -> devices
MESHES = {(8, 1, 1): 8, (1, 4, 2): 8, (1, 1, 8): 8, (1, 1, 1): 1}


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (8, 17)).astype(np.int32)
    b = dict(
        inputs=tokens[:, :-1],
        targets=tokens[:, 1:],
        segment_ids=np.ones((8, 16), np.int32),
        positions=np.broadcast_to(np.arange(16), (8, 16)).astype(np.int32),
        weights=np.ones((8, 16), np.float32),
    )
    return [b] * n


def make_trainer(mesh_shape, dispatch="dropless"):
    data, fsdp, expert = mesh_shape
    cfg = get_config(
        "moe_tiny",
        [
            *SMALL,
            f"--config.model.moe_dispatch={dispatch}",
            f"--config.mesh.data={data}",
            f"--config.mesh.fsdp={fsdp}",
            f"--config.mesh.expert={expert}",
            "--config.mesh.tensor=1",
        ],
    )
    devices = jax.devices()[: MESHES[mesh_shape]]
    return Trainer(
        cfg, ModelConfig.from_config(cfg.model, VOCAB), sharding.make_mesh(cfg.mesh, devices)
    )


@functools.cache
def run(mesh_shape, dispatch="dropless"):
    trainer = make_trainer(mesh_shape, dispatch)
    state = trainer.init_state()
    losses = []
    for batch in batches(STEPS):
        state, m = trainer.train_step(state, trainer.device_batch(batch))
        losses.append(float(m["loss"]))
    return trainer, state, losses


# Capacity dispatch's mesh equivalence is `make test-slow` (~50 s); dropless runs in make test.
@pytest.mark.parametrize("dispatch", ["dropless", pytest.param("capacity", marks=pytest.mark.slow)])
def test_losses_agree_across_meshes(dispatch):
    _, _, want = run((1, 1, 1), dispatch)
    assert want[-1] < want[0]
    for mesh_shape in [(8, 1, 1), (1, 4, 2), (1, 1, 8)]:
        _, _, got = run(mesh_shape, dispatch)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=str(mesh_shape))


def test_expert_weights_are_sharded_on_the_expert_axis():
    _, state, _ = run((1, 4, 2))
    mlp = state.params["blocks"][0]["mlp"]
    # [E, embed, mlp] and [E, mlp, embed]: experts over `expert`, embed over `fsdp`.
    assert mlp["up"].sharding.spec == P("expert", "fsdp")
    assert mlp["gate"].sharding.spec == P("expert", "fsdp")
    assert mlp["down"].sharding.spec == P("expert", None, "fsdp")
    assert mlp["up"].addressable_shards[0].data.shape == (4, 8, 16)  # [8, 32, 16] / (2, 4)
    mu = state.opt_state[1][0].mu["blocks"][0]["mlp"]["up"]
    assert mu.sharding.spec == P("expert", "fsdp")


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_expert_parallel_step_moves_tokens_by_all_to_all(dispatch):
    hlo = make_trainer((1, 1, 8), dispatch).compile().as_text()
    assert "all-to-all" in hlo
    # Without expert parallelism there is no exchange.
    assert "all-to-all" not in make_trainer((8, 1, 1), dispatch).compile().as_text()
