"""Device mesh from config, logical-axis rules, and the shardings they give params and activations.

Every parameter carries logical axis names in its `axes` metadata (e.g. `("embed", "mlp")`) and
every key activation is constrained with `constrain(x, ("batch", "seq", "embed"))`. The config's
`mesh.rules` map logical names to mesh axes, so one table decides data, FSDP and tensor
parallelism for the whole model; changing the strategy never touches model code.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
Rules = Sequence[tuple[str, str | Sequence[str] | None]]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "lm_sharding", default=None
)
_warned: set[tuple] = set()


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
    """Resolves the `-1` entry of (data, fsdp, expert, tensor) so the product equals
    `num_devices`. A config saved before an axis existed has it at 1."""
    sizes = [int(mesh_cfg[name]) if name in mesh_cfg else 1 for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: at most one of data/fsdp/expert/tensor may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if known <= 0 or num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices do not divide by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh: data*fsdp*expert*tensor = {math.prod(sizes)} but there are {num_devices} "
            "devices; set one axis to -1 to fill"
        )
    return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh with Auto axis types, so `constrain` guides XLA's
    partitioner."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_to_spec(
    axes: Sequence[str | None], rules: Rules, shape: Sequence[int] | None = None, mesh=None
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once.

    With `shape` and `mesh`, a dimension that the mapped mesh axes do not divide is replicated
    (and a warning names it) rather than failing to compile.
    """
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        names = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        names = tuple(n for n in names if n not in used)
        if mesh is not None:
            names = tuple(n for n in names if mesh.shape[n] > 1)
        if names and shape is not None and mesh is not None:
            size = math.prod(mesh.shape[n] for n in names)
            if shape[i] % size:
                key = (name, shape[i], size)
                if key not in _warned:
                    _warned.add(key)
                    logging.warning(
                        "sharding: %s of size %d does not divide by %s=%d; replicated",
                        name,
                        shape[i],
                        "x".join(names),
                        size,
                    )
                names = ()
        used.update(names)
        out.append(None if not names else names[0] if len(names) == 1 else names)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def param_axes(variable: nnx.Variable) -> tuple[str | None, ...]:
    """Logical axes of a parameter; a stacked (scanned) parameter gains a leading `layers` axis."""
    axes = tuple(variable.get_metadata().get("axes", ()))
    extra = len(variable.get_value().shape) - len(axes)
    return ("layers",) * extra + axes


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules):
    """NamedSharding for every array in an nnx.State, from its variables' logical axes."""

    def one(v):
        if isinstance(v, nnx.Variable):
            spec = logical_to_spec(param_axes(v), rules, v.get_value().shape, mesh)
            return v.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Within this block (and the jit traces it encloses), `constrain` applies the rules."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing `activation_sharding` block, or None outside one."""
    return _ACTIVE.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Pins activation `x` to the sharding its logical axes map to; a no-op outside a mesh."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(axes, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of `[batch, seq]` input arrays."""
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), rules))
