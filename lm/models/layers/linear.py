"""Projections whose kernels carry logical axis names, so sharding rules can place them.

With weight-only quantization (`use_int_weights`, model.weight_bits > 0) a Dense kernel or an
Embed table is held as int8/int4 with a float32 `scale` Param and dequantized on the fly;
activations stay float (lm/quantize/numerics.py has the layout).

LoRA (`Dense.add_lora`, driven by lm/finetune/lora.py) adds a trainable low-rank update
beside the frozen kernel, float or int (QLoRA); a Dense without adapters runs exactly as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lm.quantize.numerics import dequantize, group_count, int_dtype

# The key of LoRA input dropout. Dense is called from many places (attention, MLPs, the head,
# inside nnx.scan / remat), so a key is not threaded through every signature: the train step
# enters `lora_dropout_key` inside its traced loss function and each LoRA Dense reads it here.
_LORA_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "lora_dropout_key", default=None
)


@contextlib.contextmanager
def lora_dropout_key(key: jax.Array | None) -> Iterator[None]:
    """Turns on LoRA input dropout for the Dense calls traced inside the block; None (the
    default outside any block: eval, inference) is deterministic.

    Enter it inside the function being traced (the loss under jax.grad / jit), so the key is
    that trace's value; pass a key of its own (split from the step's key, not the one given to
    the model's residual dropout). Each adapted Dense folds its static `lora_id` into the key,
    so modules draw different masks; under `scan_layers` one scanned Dense serves every
    layer, so all layers share that module's mask (the key is the same in every iteration).
    """
    token = _LORA_DROPOUT_KEY.set(key)
    try:
        yield
    finally:
        _LORA_DROPOUT_KEY.reset(token)


class Dense(nnx.Module):
    """y = x · kernel (+ bias), contracting the last `len(in_shape)` axes of x.

    The kernel has shape `in_shape + out_shape`, e.g. `[embed, heads, head_dim]` for a query
    projection, so tensor parallelism can shard heads without reshapes. Params stay in
    `param_dtype`; the product is computed in `dtype`. Quantized, `scale` is
    `[groups, *out_shape]` (groups 1: one scale per output channel).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        axes: Sequence[str | None],
        *,
        rngs: nnx.Rngs,
        use_bias: bool = False,
        init_std: float = 0.02,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        assert len(axes) == len(self.in_shape) + len(self.out_shape), axes
        shape = self.in_shape + self.out_shape
        init = jax.nn.initializers.normal(init_std)
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype), axes=tuple(axes))
        out_axes = tuple(axes)[len(self.in_shape) :]
        self.bias = (
            nnx.Param(jnp.zeros(self.out_shape, param_dtype), axes=out_axes) if use_bias else None
        )
        self.scale = nnx.data(None)  # a Param once use_int_weights runs
        self.dtype = dtype

    def to_int(self, bits: int, group_size: int) -> None:
        """Swaps the float kernel for int slots of the same shape (and axes) plus scales;
        `lm quantize` fills them. Works on stacked (scanned) kernels [layers, ...] too."""
        shape = self.kernel.get_value().shape
        axes = tuple(self.kernel.get_metadata().get("axes", ()))
        lead = shape[: len(shape) - len(self.in_shape) - len(self.out_shape)]
        groups = group_count(math.prod(self.in_shape), group_size)
        out_axes = axes[len(self.in_shape) :]
        self.kernel = nnx.Param(jnp.zeros(shape, int_dtype(bits)), axes=axes)
        scale_shape = (*lead, groups, *self.out_shape)
        self.scale = nnx.Param(jnp.ones(scale_shape, jnp.float32), axes=(None, *out_axes))

    def weight(self) -> jax.Array:
        """The kernel `[*in_shape, *out_shape]` in the compute dtype (dequantized if int)."""
        if self.scale is None:
            return self.kernel[...].astype(self.dtype)
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        scale = self.scale[...].reshape(-1, n_out)
        w = dequantize(self.kernel[...].reshape(n_in, n_out), scale, 0, self.dtype)
        return w.reshape(*self.in_shape, *self.out_shape)

    def add_lora(
        self, rank: int, alpha: float, dropout: float, rngs: nnx.Rngs, lora_id: int = 0
    ) -> None:
        """Adds a LoRA adapter: y += (alpha / rank) * (dropout(x) · A) · B, with A `[n_in, rank]`
        and B `[rank, n_out]` over the flattened in / out axes, as `nnx.LoRAParam`s.

        B starts at zero, so a fresh adapter leaves the output unchanged; A is normal with std
        1 / sqrt(n_in) (fan-in, as nnx.LoRA), so x · A keeps x's scale and alpha / rank alone
        sets the update's size. A stacked (scanned) kernel `[*lead, *in, *out]` gets stacked
        adapters `[*lead, n_in, rank]` so nnx.scan slices them per layer like the kernel. The
        adapters are float (the kernel's dtype, float32 for an int kernel) and replicated:
        rank-sized axes are too small to shard. `lora_id` seeds this module's dropout mask.
        """
        if getattr(self, "lora_a", None) is not None:
            raise ValueError("this Dense already has a LoRA adapter")
        kernel = self.kernel.get_value()
        axes = tuple(self.kernel.get_metadata().get("axes", ()))
        n_lead = kernel.ndim - len(self.in_shape) - len(self.out_shape)
        lead = tuple(kernel.shape[:n_lead])
        # Stacked kernels usually name only their own axes (sharding.param_axes prepends
        # "layers"); the adapters follow whichever convention the kernel uses.
        lead_axes = axes[: max(0, len(axes) - len(self.in_shape) - len(self.out_shape))]
        dtype = kernel.dtype if jnp.issubdtype(kernel.dtype, jnp.floating) else jnp.float32
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        init = jax.nn.initializers.normal(n_in**-0.5)
        self.lora_a = nnx.LoRAParam(
            init(rngs.params(), (*lead, n_in, rank), dtype), axes=(*lead_axes, None, None)
        )
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((*lead, rank, n_out), dtype), axes=(*lead_axes, None, None)
        )
        self.lora_scale = float(alpha) / rank
        self.lora_dropout = float(dropout)
        self.lora_id = int(lora_id)

    def lora_delta(self, rows: jax.Array) -> jax.Array:
        """The adapter's update for rows [rows, n_in] (compute dtype) -> [rows, n_out]."""
        key = _LORA_DROPOUT_KEY.get()
        rate = self.lora_dropout
        if key is not None and rate > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.lora_id), 1 - rate, rows.shape)
            rows = jnp.where(keep, rows / (1 - rate), 0).astype(rows.dtype)
        dims = (((1,), (0,)), ((), ()))
        h = jax.lax.dot_general(rows, self.lora_a[...].astype(self.dtype), dims)
        h = h * jnp.asarray(self.lora_scale, self.dtype)  # on [rows, rank]: the cheap side
        return jax.lax.dot_general(h, self.lora_b[...].astype(self.dtype), dims)

    def __call__(self, x: jax.Array) -> jax.Array:
        # As one 2-D matmul [rows, in] @ [in, out]: its gradients are plain matmuls too, which
        # XLA's CPU backend runs ~30% faster than multi-axis contractions; free on TPU/GPU.
        # Written as lax.dot_general rather than `@`: it is the op qwix intercepts for
        # quantized training (jnp.matmul reaches it through a cached jit that qwix's patching
        # misses); the same HLO dot either way.
        lead = x.shape[: x.ndim - len(self.in_shape)]
        n_in, n_out = math.prod(self.in_shape), math.prod(self.out_shape)
        kernel = self.weight().reshape(n_in, n_out)
        rows = x.astype(self.dtype).reshape(-1, n_in)
        y = jax.lax.dot_general(rows, kernel, (((1,), (0,)), ((), ())))
        if getattr(self, "lora_a", None) is not None:  # absent: the plain program, unchanged
            y = y + self.lora_delta(rows)
        y = y.reshape(*lead, *self.out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table `[vocab, embed]`; `attend` reuses it as the tied output head.

    Quantized, `scale` is `[vocab, groups]`: each row's scales serve both the lookup and, as
    the output head (contracting embed), the per-vocab-channel scales."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        rngs: nnx.Rngs,
        axes: tuple[str | None, str | None] = ("vocab", "embed"),
        init_std: float = 0.02,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        init = jax.nn.initializers.normal(init_std)
        shape = (num_embeddings, features)
        self.embedding = nnx.Param(init(rngs.params(), shape, param_dtype), axes=axes)
        self.scale = nnx.data(None)  # a Param once use_int_weights runs
        self.dtype = dtype

    def to_int(self, bits: int, group_size: int) -> None:
        """Int slots for the table plus `[..., vocab, groups]` scales (see Dense.to_int)."""
        shape = self.embedding.get_value().shape
        axes = tuple(self.embedding.get_metadata().get("axes", ()))
        groups = group_count(shape[-1], group_size)
        self.embedding = nnx.Param(jnp.zeros(shape, int_dtype(bits)), axes=axes)
        self.scale = nnx.Param(jnp.ones((*shape[:-1], groups), jnp.float32), axes=(axes[0], None))

    def table(self) -> jax.Array:
        """The `[vocab, embed]` table in the compute dtype (dequantized if int)."""
        if self.scale is None:
            return self.embedding[...].astype(self.dtype)
        return dequantize(self.embedding[...], self.scale[...], -1, self.dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [batch, seq] -> [batch, seq, embed]."""
        if self.scale is None:
            return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
        rows = jnp.take(self.embedding[...], ids, axis=0)  # only the looked-up rows
        return dequantize(rows, jnp.take(self.scale[...], ids, axis=0), -1, self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [batch, seq, embed] -> logits [batch, seq, vocab]."""
        return jnp.einsum("bte,ve->btv", x.astype(self.dtype), self.table())


def use_int_weights(model: nnx.Module, bits: int, group_size: int) -> None:
    """Turns every module under `model` that can hold int weights (Dense, Embed, the MoE
    expert stacks: a `to_int` method) into int storage (weight-only quantization), except
    those marked `keep_float` (the MoE router). Norms and biases stay float."""
    for _, module in list(model.iter_modules()):
        if hasattr(module, "to_int") and not getattr(module, "keep_float", False):
            module.to_int(bits, group_size)
