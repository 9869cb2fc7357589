"""Sharding on 8 fake CPU devices: same losses on every mesh, params placed as the rules say.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the Makefile sets it).
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lm import sharding
from lm.config import get_config
from lm.models.transformer import ModelConfig
from lm.training.train_step import Trainer

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

SMALL = [
    "--config.model.d_model=64",
    "--config.model.d_ff=128",
    "--config.model.num_heads=4",
    "--config.model.num_layers=2",
    "--config.data.seq_len=16",
    "--config.data.batch_size=8",
    "--config.optim.warmup_steps=2",
    "--config.train.steps=6",
]
VOCAB = 256


def batches(n, seed=0):
    """Two distinct random batches, alternating, so the loss can fall within a few steps."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        tokens = rng.integers(0, VOCAB, (8, 17)).astype(np.int32)
        seg = np.ones((8, 16), np.int32)
        seg[:, 10:] = 2
        pos = np.concatenate([np.arange(10), np.arange(6)])[None].repeat(8, 0).astype(np.int32)
        out.append(
            dict(
                inputs=tokens[:, :-1],
                targets=tokens[:, 1:],
                segment_ids=seg,
                positions=pos,
                weights=np.ones((8, 16), np.float32),
            )
        )
    return [out[i % 2] for i in range(n)]


def run(mesh_shape, devices, extra=()):
    data, fsdp, tensor = mesh_shape
    cfg = get_config(
        "tiny",
        [
            *SMALL,
            f"--config.mesh.data={data}",
            f"--config.mesh.fsdp={fsdp}",
            f"--config.mesh.tensor={tensor}",
            *extra,
        ],
    )
    trainer = Trainer(
        cfg, ModelConfig.from_config(cfg.model, VOCAB), sharding.make_mesh(cfg.mesh, devices)
    )
    state = trainer.init_state()
    losses = []
    for batch in batches(cfg.train.steps):
        state, m = trainer.train_step(state, trainer.device_batch(batch))
        losses.append(float(m["loss"]))
    return trainer, state, losses


# Both layouts run in `make test-slow` (~30-45 s each); in make test, mesh equivalence is
# covered by test_moe_parallel (dropless) and test_engine (a sharded engine).
@pytest.mark.parametrize(
    "llama",
    [pytest.param(False, marks=pytest.mark.slow), pytest.param(True, marks=pytest.mark.slow)],
)
def test_losses_agree_across_meshes(llama):
    extra = (
        [
            "--config.model.position=rope",
            "--config.model.mlp=swiglu",
            "--config.model.num_kv_heads=2",
            "--config.model.tie_embeddings=false",
            "--config.model.norm=rmsnorm",
        ]
        if llama
        else []
    )
    _, _, reference = run((1, 1, 1), jax.devices()[:1], extra)
    assert reference[-1] < reference[0] - 0.05
    for shape in [(8, 1, 1), (1, 8, 1), (2, 2, 2)]:
        _, _, losses = run(shape, jax.devices(), extra)
        np.testing.assert_allclose(losses, reference, rtol=2e-5, err_msg=str(shape))


def test_params_are_sharded_as_the_rules_say():
    trainer, state, _ = run((2, 2, 2), jax.devices())
    params = state.params
    block = params["blocks"][0]
    assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")  # [vocab, embed]
    assert block["attn"]["q"]["kernel"].sharding.spec == P("fsdp", "tensor")  # [embed, heads, hd]
    assert block["attn"]["o"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
    assert block["mlp"]["up"]["kernel"].sharding.spec == P("fsdp", "tensor")  # [embed, mlp]
    assert block["mlp"]["down"]["kernel"].sharding.spec == P("tensor", "fsdp")  # [mlp, embed]
    assert block["attn_norm"]["scale"].sharding.spec == P()
    # A device holds a quarter of the up kernel: [64, 128] split 2 x 2.
    shard = block["mlp"]["up"]["kernel"].addressable_shards[0]
    assert shard.data.shape == (32, 64)
    # Adam moments follow their params.
    mu = state.opt_state[1][0].mu["blocks"][0]["mlp"]["up"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "tensor")


def test_scanned_layers_get_a_replicated_layer_axis():
    _, state, _ = run((1, 8, 1), jax.devices(), ["--config.model.scan_layers=true"])
    kernel = state.params["blocks"]["mlp"]["up"]["kernel"]
    assert kernel.shape == (2, 64, 128)
    assert kernel.sharding.spec == P(None, "fsdp")


def test_mesh_shape_fills_minus_one_and_rejects_bad_products():
    cfg = get_config("tiny", ["--config.mesh.data=-1", "--config.mesh.tensor=2"])
    assert sharding.mesh_shape(cfg.mesh, 8) == (4, 1, 1, 2)
    cfg = get_config("tiny", ["--config.mesh.data=3"])
    with pytest.raises(ValueError, match="devices"):
        sharding.mesh_shape(cfg.mesh, 8)
