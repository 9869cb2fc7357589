"""Weight-only quantization of a mixture-of-experts model: the expert stacks (most of a
Mixtral's weights) become int8 per expert and output channel, the router stays float, the
logits stay close, and the checkpoint shrinks like a dense model's."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm.models.layers.moe import MoE
from tests.test_quantize import init_model, logits, small_model_cfg, toy_batch

E, F = 4, 32


def moe_cfg(scan_layers: bool, d_model: int = 64, moe_d_ff: int = F):
    return small_model_cfg(
        d_model=d_model,
        num_experts=E,
        experts_per_token=2,
        moe_d_ff=moe_d_ff,
        mlp="swiglu",
        position="rope",
        norm="rmsnorm",
        use_bias=False,
        grouped_matmul="ragged_dot",
        scan_layers=scan_layers,
    )


@pytest.mark.parametrize("scan_layers", [False, True])
def test_expert_stacks_are_int8_per_expert_and_the_router_stays_float(scan_layers):
    from lm.quantize.weights import quantize_model

    model = init_model(moe_cfg(scan_layers))
    qmodel = quantize_model(model, 8, 0)
    source = dict(model.iter_modules())
    moes = [(path, m) for path, m in qmodel.iter_modules() if isinstance(m, MoE)]
    assert len(moes) == (1 if scan_layers else 2)
    for path, qmoe in moes:
        fmoe = source[path]
        for name in ("gate", "up", "down"):
            w = np.asarray(getattr(fmoe, name)[...])  # [(layers,) E, in, out]
            q = np.asarray(getattr(qmoe, name)[...])
            scale = np.asarray(getattr(qmoe, f"{name}_scale")[...])
            assert q.dtype == np.int8 and q.shape == w.shape
            assert scale.shape == (*w.shape[:-2], 1, w.shape[-1])  # per expert, per column
            # An independent absmax: each (expert, column)'s largest |w| maps to 127.
            np.testing.assert_allclose(scale[..., 0, :], np.abs(w).max(axis=-2) / 127, rtol=1e-6)
            assert np.all(np.abs(q * scale - w) <= scale / 2 + 1e-7)
        assert qmoe.router.scale is None and qmoe.router.kernel[...].dtype == jnp.float32
        np.testing.assert_array_equal(qmoe.router.kernel[...], fmoe.router.kernel[...])
    batch = toy_batch()
    ref = logits(model, batch)
    err = float(jnp.linalg.norm(logits(qmodel, batch) - ref) / jnp.linalg.norm(ref))
    assert 0 < err < 0.03, err


def test_moe_checkpoint_is_at_least_3_5x_smaller(tmp_path):
    from lm.quantize.weights import quantize_model, save_params

    # Wide enough that the weights, not orbax's per-array metadata, make up the checkpoint
    # (at d_model 64 the metadata alone holds the ratio near 2.8x).
    model = init_model(moe_cfg(False, d_model=256, moe_d_ff=512))

    def size(step_dir: str) -> int:
        return sum(
            os.path.getsize(os.path.join(root, f))
            for root, _, files in os.walk(step_dir)
            for f in files
        )

    fp32 = size(save_params(str(tmp_path / "fp32"), 0, nnx.state(model, nnx.Param)))
    qparams = nnx.state(quantize_model(model, 8, 0), nnx.Param)
    int8 = size(save_params(str(tmp_path / "int8"), 0, qparams))
    assert fp32 / int8 >= 3.5, (fp32, int8)
