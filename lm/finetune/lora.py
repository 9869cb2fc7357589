"""LoRA and QLoRA adapters for `lm finetune` (cfg.finetune.lora: rank, alpha, dropout, pattern).

Why our own and not qwix's LoRA: qwix intercepts dot_general and finds the weight by tracing
the operand back to a Param, but an int8 Dense dequantizes before its dot, so that operand is
not a Param. Owning the adapter in Dense (`Dense.add_lora`, lm/models/layers/linear.py) keeps
logical axes for sharding, works the same on float and int kernels, and makes merging exact.

The flow: build (or restore) the base model, `add_lora` (every Dense whose module path matches
the pattern gains `lora_a` / `lora_b`), `split_lora` into trainable adapters and the frozen rest,
train only the adapters, then `merge_lora` / `merged_params` to serve a plain model.

Module paths are the "/"-joined paths of quantize/training.py (`blocks/0/attn/q`,
`blocks/1/mlp/down`, `head`; `blocks/attn/q` under scan_layers), matched with `re.fullmatch`
like qwix's `quant.module_paths`, so a pattern must cover the whole path (`.*attn/q`).

What can carry an adapter: Dense modules only. The tied output head (Embed.attend) and the
MoE expert stacks (`mlp/gate|up|down` Params of shape [experts, in, out], not Dense) are
skipped; in an MoE model the default pattern adapts attention and the MLPs of any dense
layers (a shared-expert MLP, `mlp/shared/up`, or the router, `mlp/router`, only if the
pattern names them).

Dropout on the adapter input needs a key in `lora_dropout_key` (entered inside the traced loss);
without one (eval, inference) there is none. Under scan_layers all layers share one scanned
Dense and so one mask per step. With quant.training=int8|fp8 (qwix) the adapter's two products
are inside Dense, so qwix quantizes them like the kernel's.

QLoRA: on an int8/int4 weight-quantized base (lm/quantize/weights.quantize_model) the int
kernels and their scales stay frozen ints; only A / B (float32) train.

`nnx.LoRAParam` subclasses `nnx.Param` (checked on flax 0.12.8): `nnx.state(model, nnx.Param)`
includes the adapters, so put `nnx.LoRAParam` first in any split (as `split_lora` does) and
count base params with `base_state` rather than a Param filter.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from lm.errors import ConfigError
from lm.models.layers.linear import Dense, lora_dropout_key
from lm.quantize.numerics import dequantize, quantize

__all__ = [
    "add_lora",
    "adapter_metadata",
    "has_lora",
    "lora_dropout_key",
    "lora_param_count",
    "merge_lora",
    "merged_params",
    "split_lora",
]

_ADAPTER_ATTRS = ("lora_a", "lora_b", "lora_scale", "lora_dropout", "lora_id")


def _path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def has_lora(module: nnx.Module) -> bool:
    """Whether `module` is a Dense carrying an adapter."""
    return isinstance(module, Dense) and getattr(module, "lora_a", None) is not None


def _check(lora_cfg) -> re.Pattern:
    if int(lora_cfg.rank) <= 0:
        raise ConfigError(
            f"finetune.lora.rank must be > 0 to add adapters (0 is full fine-tuning), "
            f"got {lora_cfg.rank}"
        )
    if not 0.0 <= float(lora_cfg.dropout) < 1.0:
        raise ConfigError(f"finetune.lora.dropout must be in [0, 1), got {lora_cfg.dropout}")
    try:
        return re.compile(lora_cfg.pattern)
    except re.error as e:
        raise ConfigError(
            f"finetune.lora.pattern {lora_cfg.pattern!r} is not a regex: {e}"
        ) from None


def add_lora(model: nnx.Module, lora_cfg, rngs: nnx.Rngs) -> list[str]:
    """Adds an adapter to every Dense of `model` whose module path fullmatches
    `lora_cfg.pattern`, in place; returns the matched paths (sorted, as nnx walks them).

    Works on list-of-layers and scanned models (stacked kernels get stacked adapters), on
    float and int (QLoRA) kernels. Each adapted Dense gets its index in the returned list as
    its dropout id, so the same model always draws the same masks for the same key."""
    pattern = _check(lora_cfg)
    dense = [(_path(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, Dense)]
    matched = [(path, m) for path, m in dense if pattern.fullmatch(path)]
    if not matched:
        some = ", ".join(path for path, _ in dense[:8])
        raise ConfigError(
            f"finetune.lora.pattern {lora_cfg.pattern!r} matches no Dense module (it must match "
            f"a whole path); {len(dense)} paths such as: {some}"
        )
    for lora_id, (path, module) in enumerate(matched):
        if has_lora(module):
            raise ConfigError(f"{path} already has a LoRA adapter; merge_lora before adding more")
        module.add_lora(
            int(lora_cfg.rank), float(lora_cfg.alpha), float(lora_cfg.dropout), rngs, lora_id
        )
    return [path for path, _ in matched]


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, lora_state, base_state): the adapters (train these) and everything else
    (frozen: float or int kernels, scales, norms). `nnx.merge(graphdef, lora, base)` rebuilds
    the model. LoRAParam is a Param subclass, so it is matched first."""
    return nnx.split(model, nnx.LoRAParam, ...)


def lora_param_count(state: nnx.State) -> int:
    """Number of scalars in a state (e.g. the adapters from `split_lora`)."""
    return sum(int(x.size) for x in jax.tree.leaves(state))


def _merge_dense(module: Dense, requantize: bool) -> None:
    """kernel += scale * A · B; an int kernel is dequantized first and left float (or
    requantized at its old bits and groups); then the adapter attributes are removed."""
    kernel = module.kernel.get_value()
    axes = tuple(module.kernel.get_metadata().get("axes", ()))
    n_in, n_out = math.prod(module.in_shape), math.prod(module.out_shape)
    lead = kernel.shape[: kernel.ndim - len(module.in_shape) - len(module.out_shape)]
    a = module.lora_a.get_value().astype(jnp.float32)  # [*lead, n_in, rank]
    b = module.lora_b.get_value().astype(jnp.float32)  # [*lead, rank, n_out]
    delta = module.lora_scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    flat = kernel.reshape(*lead, n_in, n_out)
    if module.scale is None:
        w = (flat.astype(jnp.float32) + delta).astype(kernel.dtype)
        module.kernel = nnx.Param(w.reshape(kernel.shape), axes=axes)
    else:
        scale = module.scale.get_value()  # [*lead, groups, *out]
        groups = scale.shape[len(lead)]
        w = dequantize(flat, scale.reshape(*lead, groups, n_out), -2) + delta
        if requantize:
            bits = 8 if kernel.dtype == jnp.int8 else 4
            q, s = quantize(w, -2, bits, n_in // groups if groups > 1 else 0)
            scale_axes = tuple(module.scale.get_metadata().get("axes", ()))
            module.kernel = nnx.Param(q.reshape(kernel.shape), axes=axes)
            module.scale = nnx.Param(s.reshape(scale.shape), axes=scale_axes)
        else:
            module.kernel = nnx.Param(w.reshape(kernel.shape), axes=axes)  # float32
            module.scale = nnx.data(None)
    for name in _ADAPTER_ATTRS:
        delattr(module, name)


def merge_lora(model: nnx.Module, requantize: bool = False) -> None:
    """Folds every adapter into its kernel, in place, leaving plain Dense modules.

    Float kernels: kernel += (alpha / rank) · A · B, computed in float32 and cast back to the
    kernel's dtype. Int kernels (QLoRA): the merged kernel is dequantize(kernel) + update, kept
    as a FLOAT32 kernel (its `scale` removed), so the merged model computes what the adapter
    model did; the model is then mixed (adapted Dense float, the rest int) and must be served
    from its own graphdef (`merged_params`), not restored under the int config. With
    `requantize=True` the merged kernel is quantized again at its old bits and group size, so
    the model fits the int config and checkpoint layout, at one more rounding error."""
    for _, module in list(nnx.iter_modules(model)):
        if has_lora(module):
            _merge_dense(module, requantize)


def merged_params(
    graphdef: nnx.GraphDef, lora_state: nnx.State, base_state: nnx.State, requantize: bool = False
) -> tuple[nnx.GraphDef, nnx.State]:
    """(plain graphdef, plain params) for serving / saving: the model of `split_lora`'s
    pieces with every adapter merged (`merge_lora`). The inputs are not modified."""
    model = nnx.merge(graphdef, lora_state, base_state, copy=True)
    merge_lora(model, requantize)
    return nnx.split(model, nnx.Param)


def adapter_metadata(lora_cfg, paths: list[str]) -> dict:
    """What to write beside an adapter checkpoint as adapter.json: the settings that rebuild
    the same adapters on the same base (rank, alpha, dropout, pattern) and the matched paths."""
    return dict(
        rank=int(lora_cfg.rank),
        alpha=float(lora_cfg.alpha),
        dropout=float(lora_cfg.dropout),
        pattern=str(lora_cfg.pattern),
        paths=list(paths),
    )
