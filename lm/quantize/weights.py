"""`lm quantize`: a weight-only int8 / int4 copy of a run's newest checkpoint, for inference.

Why weight-only: at inference a small model is bound by reading its weights, so storing them
at 8 (or 4) bits cuts the checkpoint ~4x (~6x for int4 with a float32 scale per 32 weights;
per-array metadata and the float norms and biases take the rest) while activations, norms and
the softmax stay float; the model dequantizes each kernel where it uses it (Dense.weight).

What is written to `out` (a workdir `lm sample` / `restore_params` read like any run):
- config.json: the run's config with model.weight_bits / model.weight_group_size set,
  quant.training=none, the tokenizer path it already references and data.cache_dir pointing
  at the source run's packed data (so evaluation reuses the packs; keep the source run);
- checkpoints/<step>/state: an orbax checkpoint of `{"params": ...}` only: every Dense kernel,
  Embed table and MoE expert stack (gate / up / down, per expert) as int8 (per-output-channel
  scales) or int4 (jnp.int4, 4 bits an element on disk; `group_size` weights per scale along
  the contraction axis), its float32 scale, and every other param (norms, biases, the MoE
  router, kept float so top-k does not flip) unchanged;
- quantized.json: source, step, bits, group size and the checkpoint's size on disk.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import ml_collections
from flax import nnx

from lm import storage
from lm.errors import CheckpointError, ConfigError
from lm.models.layers.linear import Dense, Embed
from lm.models.layers.moe import MoE
from lm.models.transformer import Transformer
from lm.quantize.numerics import BITS, quantize

MARKER = "quantized.json"
# One compiled program per (shape, axis, bits, group): op by op, every primitive of every
# distinct kernel shape compiles on its own (~40 compiles for a 2-layer model).
_quantize = jax.jit(quantize, static_argnums=(1, 2, 3))


def dir_bytes(root: str) -> int:
    """Total size of the files under `root` (recursively), in bytes."""
    return sum(storage.path(f).stat().length for f in storage.walk_files(root))


def _dense_values(kernel: jax.Array, layer: Dense, bits: int, group_size: int) -> dict:
    """Float kernel [*lead, *in, *out] -> {kernel: ints, same shape; scale: [*lead, groups,
    *out]}, contracting the flattened in axes (lead: stacked layers)."""
    n_in, n_out = math.prod(layer.in_shape), math.prod(layer.out_shape)
    lead = kernel.shape[: kernel.ndim - len(layer.in_shape) - len(layer.out_shape)]
    q, scale = _quantize(kernel.reshape(*lead, n_in, n_out), -2, bits, group_size)
    return {
        "kernel": q.reshape(kernel.shape),
        "scale": scale.reshape(*lead, scale.shape[-2], *layer.out_shape),
    }


def quantize_model(model: Transformer, bits: int, group_size: int) -> Transformer:
    """A weight-quantized copy of a (float) Transformer: the same modules, every Dense and
    Embed holding ints + scales, every other param copied."""
    if bits not in BITS:
        raise ConfigError(f"quantize: bits must be 8 or 4, got {bits}")
    group = group_size if bits == 4 else 0
    qcfg = dataclasses.replace(model.cfg, weight_bits=bits, weight_group_size=group)
    qmodel = nnx.eval_shape(lambda: Transformer(qcfg, rngs=nnx.Rngs(0)))
    source = dict(model.iter_modules())
    for path, qmod in qmodel.iter_modules():
        fmod = source[path]
        values = {}
        if isinstance(qmod, Dense) and qmod.scale is not None:  # not a float-kept router
            values = _dense_values(fmod.kernel.get_value(), qmod, bits, group)
        elif isinstance(qmod, Embed):
            q, scale = _quantize(fmod.embedding.get_value(), -1, bits, group)
            values = {"embedding": q, "scale": scale}
        elif isinstance(qmod, MoE):  # expert stacks [..., E, in, out], contracting `in`
            for name in ("gate", "up", "down"):
                if getattr(fmod, name) is not None:
                    q, scale = _quantize(getattr(fmod, name).get_value(), -2, bits, group)
                    values.update({name: q, f"{name}_scale": scale})
        for name, var in vars(qmod).items():
            if isinstance(var, nnx.Param):
                var.set_value(values[name] if name in values else getattr(fmod, name).get_value())
    return qmodel


def quantize_loaded(graphdef: nnx.GraphDef, params: nnx.State, bits: int, group_size: int):
    """Load-time weight-only quantization (`lm sample --weight_bits=8`): the restored float
    model's (graphdef, params, model_cfg) as int weights + scales, the same as sampling from
    an `lm quantize` copy, without writing one."""
    model = nnx.merge(graphdef, params)
    if model.cfg.weight_bits:
        raise ConfigError(
            f"--weight_bits: this run is already int{model.cfg.weight_bits}; drop the flag"
        )
    qmodel = quantize_model(model, bits, group_size if bits == 4 else 0)
    qgraphdef, qparams = nnx.split(qmodel, nnx.Param)
    return qgraphdef, qparams, qmodel.cfg


def quantized_config(cfg: ml_collections.ConfigDict, workdir: str, bits: int, group: int):
    """The run config of the quantized copy of `workdir` (see the module docstring)."""
    from lm.data.packed import cache_root

    out = ml_collections.ConfigDict(cfg.to_dict())
    out.model.weight_bits = bits
    out.model.weight_group_size = group
    if "quant" in out:
        out.quant.training = "none"  # weight-only int inference; no qwix wrapping
    out.data.cache_dir = storage.absolute(cache_root(cfg, workdir))
    return out


def save_params(directory: str, step: int, params: nnx.State) -> str:
    """Writes a params-only orbax checkpoint `{"params": params}` as `<directory>/<step>`
    (the layout Checkpointer reads, restoring onto any mesh); returns that step directory.

    The arrays are written as host numpy arrays (by process 0; `restore_run` leaves every
    param replicated): orbax then keeps no per-array sharding record and lays int4 out at 4
    bits. Measured on `tiny` (make bench, one CPU device): int8 716 KB instead of 787 KB as
    jax arrays, int4 440 KB instead of 480 KB (1.1 MB on 8 CPU devices); per-array metadata
    is ~10% of a model this small, and the int8 / fp32 ratio went from 3.25x to 3.55x.
    """
    import numpy as np

    from lm.training.checkpoint import Checkpointer

    host = jax.tree.map(np.asarray, params)
    ckpt = Checkpointer(directory, keep=1, async_save=False)
    try:
        ckpt.save(step, {"params": host}, {})
        ckpt.wait()
    finally:
        ckpt.close()
    return storage.join(directory, str(step))


def quantize_workdir(workdir: str, out: str, bits: int = 8, group_size: int = 128) -> str:
    """Quantizes the newest checkpoint of the run in `workdir` into a new workdir `out`
    (int8 per channel, or int4 with `group_size` weights per scale); returns a summary line."""
    from lm.training.checkpoint import Checkpointer
    from lm.training.restore import restore_run
    from lm.training.setup import load_run_config, save_config

    if bits not in BITS:
        raise ConfigError(f"lm quantize: --bits must be 8 or 4, got {bits}")
    if group_size < 0:
        raise ConfigError(f"lm quantize: --group_size must be >= 0, got {group_size}")
    group = group_size if bits == 4 else 0
    cfg = load_run_config(workdir)
    if cfg.model.get("weight_bits", 0):
        raise CheckpointError(
            f"{workdir} is already weight-quantized (int{cfg.model.weight_bits}); quantize the "
            "original full-precision run instead"
        )
    if storage.absolute(workdir) == storage.absolute(out):
        raise ConfigError("lm quantize: --out must be a new workdir, not the run itself")
    if storage.exists(storage.join(out, "checkpoints")) and storage.listdir(
        storage.join(out, "checkpoints")
    ):
        raise ConfigError(f"lm quantize: {out} already holds checkpoints; pick a new --out")
    ckpt = Checkpointer(storage.join(workdir, "checkpoints"), keep=1, async_save=False)
    try:
        steps = ckpt.steps()
    finally:
        ckpt.close()
    if not steps:
        raise CheckpointError(
            f"{workdir} has no checkpoint to quantize (nothing in {workdir}/checkpoints); "
            "train it first"
        )
    qcfg = quantized_config(cfg, workdir, bits, group)
    run = restore_run(workdir)
    model = nnx.merge(run.trainer.graphdef, run.params)
    qparams = nnx.state(quantize_model(model, bits, group), nnx.Param)
    storage.makedirs(out)
    if jax.process_index() == 0:
        save_config(qcfg, out)
    step_dir = save_params(storage.join(out, "checkpoints"), run.step, qparams)
    size = dir_bytes(step_dir)
    kind = f"int{bits} per channel" if not group else f"int{bits}, {group} weights per scale"
    if jax.process_index() == 0:
        marker = dict(
            source=storage.absolute(workdir),
            step=run.step,
            bits=bits,
            group_size=group,
            checkpoint_bytes=size,
        )
        storage.write_text(storage.join(out, MARKER), json.dumps(marker, indent=2))
    return (
        f"quantized {workdir} (checkpoint {run.step}) to {kind}: {out} "
        f"({size / 2**20:.2f} MiB of params on disk)"
    )
