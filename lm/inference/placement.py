"""Where the engine's arrays live: its KV cache sharded like the model's activations, its
per-step host inputs replicated over the mesh, its outputs brought back to the host.

On a pod every process steps the same engine in lockstep with the same host values, so a
replicated global array built from them is the same on all; outputs are gathered.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lm import sharding


def default_rules(mesh):
    """The default logical-axis rules (lm.config's mesh.rules) for an engine on `mesh`."""
    if mesh is None:
        return None
    from lm.config import default_config

    return tuple(tuple(r) for r in default_config().mesh.rules)


def step_rules(mesh, rules, one_row: bool = False):
    """The activation rules inside the compiled steps; a one-row prefill leaves its batch of 1
    unsharded on purpose (instead of the rules' warning that 1 does not divide)."""
    if mesh is None:
        return contextlib.nullcontext()
    if one_row:
        rules = tuple((name, None if name == "batch" else to) for name, to in rules)
    return sharding.activation_sharding(mesh, rules)


def to_devices(mesh, inputs: tuple) -> tuple:
    """Host values as arrays for a step: numpy in one process, replicated global arrays on a
    pod (where jit does not take host values for a multi-process mesh)."""
    if mesh is None or jax.process_count() == 1:  # jit replicates numpy inputs itself
        return tuple(np.asarray(x) for x in inputs)
    replicated = NamedSharding(mesh, PartitionSpec())
    out = []
    for x in inputs:
        x = np.asarray(x)
        out.append(jax.make_array_from_callback(x.shape, replicated, lambda i, x=x: x[i]))
    return tuple(out)


def fetch(out: jax.Array) -> np.ndarray:
    """The whole array on this host (gathered from every process on a pod)."""
    if jax.process_count() == 1 or out.is_fully_addressable:
        return np.asarray(out)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(out, tiled=True))


def to_host(values) -> list:
    """A step's outputs as numpy (None stays None), gathered from every process on a pod."""
    return [jax.tree.map(fetch, v) if v is not None else None for v in values]


def empty_cache(engine):
    """The model's KV cache for `engine.slots` rows of `engine.max_len`, sharded [batch (the
    slots), -, kv_heads, head_dim] by the rules (a layer scan's stacked cache leads with
    `layers`); a slot count the data axis does not divide is replicated (with a warning)."""
    model = nnx.merge(engine.graphdef, engine.params)

    def make():
        return model.init_cache(engine.slots, engine.max_len)

    abstract = jax.eval_shape(make)
    if engine.mesh is None:
        return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    stacked = engine.model_cfg.scan_layers

    def spec(a):
        lead = ("layers",) if stacked else ()
        axes = lead + ("batch", None, "kv_heads", "head_dim")[: a.ndim - len(lead)]
        return NamedSharding(
            engine.mesh, sharding.logical_to_spec(axes, engine.rules, a.shape, engine.mesh)
        )

    return jax.jit(make, out_shardings=jax.tree.map(spec, abstract))()
