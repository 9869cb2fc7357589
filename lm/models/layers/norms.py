"""LayerNorm (GPT-2) and RMSNorm (Llama), computed in float32 whatever the compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Norm(nnx.Module):
    """`kind="layernorm"`: (x - mean) / std * scale + bias; `kind="rmsnorm"`: x / rms * scale."""

    def __init__(
        self,
        features: int,
        kind: str,
        eps: float,
        use_bias: bool,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        if kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"model.norm must be layernorm or rmsnorm, got {kind!r}")
        self.kind, self.eps, self.dtype = kind, eps, dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), axes=("norm",))
        with_bias = use_bias and kind == "layernorm"
        self.bias = (
            nnx.Param(jnp.zeros((features,), param_dtype), axes=("norm",)) if with_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)
