"""Quantized training through qwix: `quant.training=int8|fp8` wraps the model, the model code
unchanged, with one qwix rule on the module paths `quant.module_paths` (a regex over paths
like `blocks/0/attn/q`, `blocks/1/mlp/down`, `embed`, `head`; `blocks/attn/q` when scanned).

What qwix intercepts: `jax.lax.dot_general` and `jax.numpy.einsum` (plus conv / ragged_dot)
called from inside the wrapped method. Dense calls `jax.lax.dot_general` (a plain `@` goes
through jnp.matmul's cached jit and is *not* intercepted) and the tied head (`Embed.attend`)
an einsum, so every weight product is quantized: weights per output channel, activations per
row (dynamic absmax), int8 x int8 -> int32 in the forward pass; gradients flow straight
through in float (qwix QT with no backward qtype). The provider below quantizes only weight
products: every one made inside a Dense or Embed, and elsewhere those qwix traces back to a
Param; attention's q.k and p.v einsums stay float. tests/test_quantize.py counts them in the
train step's jaxpr: 6 per layer (q, k, v, o, up, down) plus the tied head.

`loss_chunk > 0` computes the output head outside the module (lm/models/loss.py); then only
`Transformer.hidden` is wrapped and the head stays float.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lm.errors import ConfigError

TRAINING = ("none", "int8", "fp8")
# Backends where qwix's fp8 (float8_e4m3fn) matmuls compile and run. XLA:CPU does (it has no
# fp8 units, so there it is the numerics only, not a speedup); tests/test_quantize.py trains
# through them.
FP8_BACKENDS = ("cpu", "gpu", "tpu")


def _qtype(name: str):
    return jnp.int8 if name == "int8" else jnp.float8_e4m3fn


def check_quant_training(cfg) -> None:
    """One-line ConfigErrors for quant.* settings before anything slow runs."""
    quant = cfg.get("quant")
    mode = quant.training if quant is not None else "none"
    if mode not in TRAINING:
        raise ConfigError(f"quant.training must be one of {', '.join(TRAINING)}, got {mode!r}")
    if mode == "fp8" and jax.default_backend() not in FP8_BACKENDS:
        raise ConfigError(
            f"quant.training=fp8 is not supported on the {jax.default_backend()} backend; "
            "use quant.training=int8"
        )
    ft = cfg.get("finetune")
    qlora = ft is not None and ft.get("init") and ft.lora.rank > 0  # adapters on an int base
    if cfg.model.get("weight_bits", 0) and not qlora:
        raise ConfigError(
            f"model.weight_bits={cfg.model.weight_bits} is weight-only quantization for "
            "inference (written by `lm quantize`); training needs model.weight_bits=0 "
            "(for quantized training set quant.training=int8)"
        )


def _provider_class():
    import qwix
    from qwix._src.utils import flax_util

    from lm.models.layers.linear import Dense, Embed

    def has_weight(operands) -> bool:
        # Every product made inside Dense / Embed multiplies by its weight. Asking qwix alone
        # (find_param) misses a kernel reshaped under jax.grad: Dense contracts
        # `kernel.reshape(n_in, n_out)`, which for attention's [embed, heads, head_dim]
        # kernels is a new JVP tracer that qwix cannot trace back to its Param, so those
        # projections silently stayed float. find_param still covers weights used elsewhere.
        if isinstance(flax_util.get_current_module(), (Dense, Embed)):
            return True
        return any(flax_util.find_param(x) is not None for x in operands)

    class WeightMatmulQtProvider(qwix.QtProvider):
        """qwix's QtProvider, quantizing only products with a weight (Param) operand."""

        def dot_general(self, lhs, rhs, *args, **kwargs):
            if not has_weight((lhs, rhs)):
                return jax.lax.dot_general(lhs, rhs, *args, **kwargs)
            return super().dot_general(lhs, rhs, *args, **kwargs)

        def einsum(self, equation, *operands, **kwargs):
            if not has_weight(operands):
                return jnp.einsum(equation, *operands, **kwargs)
            return super().einsum(equation, *operands, **kwargs)

    return WeightMatmulQtProvider


def quantize_for_training(model: nnx.Module, quant, loss_chunk: int = 0) -> nnx.Module:
    """A copy of `model` (abstract or concrete) whose forward pass runs qwix's quantized
    matmuls; the params are the same float Params, so the train state does not change."""
    import qwix

    rule = qwix.QtRule(
        module_path=quant.module_paths,
        weight_qtype=_qtype(quant.training),
        act_qtype=_qtype(quant.training),
    )
    provider = _provider_class()([rule])
    method = "hidden" if loss_chunk > 0 else "__call__"
    dummy = jnp.zeros((1, 1), jnp.int32)
    # skip_nnx_init: dynamic-range QT creates no variables, so the model need not run (it
    # may be shapes only); qwix still tags every module with its path.
    return qwix.quantize_model(
        model, provider, dummy, dummy, dummy, methods=(method,), skip_nnx_init=True
    )


def maybe_quantize_for_training(model: nnx.Module, quant: Any, loss_chunk: int) -> nnx.Module:
    """`model` unchanged when quant is None or quant.training is none."""
    if quant is None or quant.get("training", "none") == "none":
        return model
    if quant.training not in TRAINING:
        raise ConfigError(f"quant.training must be one of {', '.join(TRAINING)}")
    return quantize_for_training(model, quant, loss_chunk)
