"""Moving routed tokens to their experts and back: dropless (sorted + grouped matmul) and
capacity (fixed slots per expert) dispatch, on one device or expert-parallel.

Shapes: tokens x [batch, seq, embed]; the router's choice `experts` [batch, seq, k] (expert ids)
with `gates` [batch, seq, k]; expert weights gate/up [E, embed, mlp] and down [E, mlp, embed].

Under a mesh the dispatch runs in a `jax.shard_map` over the batch (and seq) shards of the
activation rules, so each device sorts only its own tokens. When the rules shard the `experts`
axis over mesh axes of size > 1 (expert parallelism), each device holds E / n experts and the
assignments travel to the devices of their experts with `jax.lax.all_to_all` and back.
All-to-all needs static shapes, so the dropless send buffer to each expert shard is sized for the
worst case (every local assignment to that shard): exact, at n times the memory of the ideal
ragged exchange; capacity mode sends exactly its [E, capacity] slots.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lm import sharding

log = logging.getLogger(__name__)

GROUPED_MATMULS = ("auto", "ragged_dot", "tokamax", "tiled")
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.info("moe: %s", message)


def choose_grouped_matmul(config: str, backend: str) -> tuple[str, str]:
    """(implementation, reason for a fallback or "") for `model.grouped_matmul` on `backend`.

    tokamax's ragged_dot has Pallas/Triton kernels for TPU and GPU; on CPU it would only run its
    XLA reference path, so `auto` on CPU uses `jax.lax.ragged_dot` (same math, XLA's own
    lowering). An explicit choice is honoured on any backend (tokamax on CPU runs its reference
    path, which the tests use to check the call). `tiled` (`tiled_grouped_matmul`) is meant
    for small models on CPU.
    """
    if config not in GROUPED_MATMULS:
        raise ValueError(f"model.grouped_matmul must be one of {GROUPED_MATMULS}: {config!r}")
    if config != "auto":
        return config, ""
    if backend in ("gpu", "tpu"):
        return "tokamax", ""
    return "ragged_dot", f"grouped_matmul={config}: tokamax has no {backend} kernel"


def grouped_matmul(config: str) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """`(lhs [M, K], rhs [G, K, N], group_sizes [G]) -> [M, N]`: rows of group g (contiguous,
    in order) times rhs[g]; rows past sum(group_sizes) come out zero."""
    impl, reason = choose_grouped_matmul(config, jax.default_backend())
    if reason:
        _log_once(f"{reason}; using jax.lax.ragged_dot")
    if impl == "tokamax":
        import tokamax
        from absl import flags

        # tokamax reads its options from absl flags and, if nothing has parsed them, parses
        # sys.argv itself, which fails on any program with flags of its own (`lm train
        # --experiment=...`, pytest). Taking absl's defaults is what an unparsed run means.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        return lambda lhs, rhs, sizes: tokamax.ragged_dot(lhs, rhs, sizes)
    if impl == "tiled":
        return tiled_grouped_matmul
    return lambda lhs, rhs, sizes: jax.lax.ragged_dot(lhs, rhs, sizes)


def tiled_grouped_matmul(lhs: jax.Array, rhs: jax.Array, sizes: jax.Array, tile: int = 64):
    """`jax.lax.ragged_dot`'s result by padding every group to a multiple of `tile` rows, so
    each tile belongs to one group, and one batched matmul of the tiles with their group's
    weights (gathered per tile, as MegaBlocks' block-sparse layout).

    Why: XLA:CPU lowers ragged_dot to one masked dense matmul per group (G times the FLOPs);
    for moe_tiny (E=8) this costs near-dense time, 4-6x less than ragged_dot on a 2-core CPU.
    The gathered weights take n_tiles * K * N memory, so it only suits small models.
    lhs [M, K] rows grouped in order, rhs [G, K, N], sizes [G] -> [M, N]; rows past
    sum(sizes) come out zero, and a group with no rows gets zero gradient.
    """
    m, k = lhs.shape
    g, _, n = rhs.shape
    padded = (sizes + tile - 1) // tile * tile
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    end = jnp.cumsum(sizes)
    rows = jnp.arange(m)
    group = jnp.searchsorted(end, rows, side="right")  # g past the last group
    valid = group < g
    group = jnp.minimum(group, g - 1)
    total = -(-(m + g * (tile - 1)) // tile) * tile  # >= sum(padded) for any sizes
    dest = jnp.where(valid, padded_start[group] + rows - (end - sizes)[group], total)
    buf = jnp.zeros((total, k), lhs.dtype).at[dest].set(lhs, mode="drop")
    starts = jnp.arange(total // tile) * tile
    tile_group = jnp.minimum(jnp.searchsorted(padded_end, starts, side="right"), g - 1)
    out = jnp.einsum("tik,tkn->tin", buf.reshape(-1, tile, k), rhs[tile_group])
    return out.reshape(total, n).at[dest].get(mode="fill", fill_value=0)


def capacity(seq: int, k: int, num_experts: int, factor: float) -> int:
    """Slots per expert and row: ceil(factor * seq * k / E), at most seq (a token picks an expert
    at most once, so seq slots never drop) and at least 1."""
    return max(1, min(seq, math.ceil(factor * seq * k / num_experts)))


def capacity_slots(experts: jax.Array, num_experts: int, cap: int) -> tuple[jax.Array, jax.Array]:
    """Slot of every assignment within its expert's per-row buffer, and whether it fits.

    experts [batch, seq, k] -> (slot [batch, seq, k] int32, `cap` where dropped; keep [batch,
    seq, k] bool). Each row (sequence) is a group with its own `cap` slots per expert, so the
    result does not depend on how the batch is sharded. Priority as in GShard / Switch: every
    token's first choice before any second choice, then by position in the row.
    """
    b, s, k = experts.shape
    order = experts.transpose(0, 2, 1).reshape(b, k * s)  # choice-major
    onehot = jax.nn.one_hot(order, num_experts, dtype=jnp.int32)  # [batch, k*seq, E]
    before = jnp.cumsum(onehot, axis=1) - onehot  # earlier assignments to the same expert
    slot = jnp.take_along_axis(before, order[..., None], axis=-1)[..., 0]
    slot = slot.reshape(b, k, s).transpose(0, 2, 1)
    keep = slot < cap
    return jnp.where(keep, slot, cap).astype(jnp.int32), keep


def _activation(mlp: str, up: jax.Array, gate: jax.Array | None) -> jax.Array:
    return jax.nn.gelu(up) if gate is None else jax.nn.silu(gate) * up


def _grouped_ffn(rows, sizes, weights, mlp, matmul):
    """rows [M, embed] sorted by expert, sizes [G] -> [M, embed] through each row's expert."""
    gate = matmul(rows, weights["gate"], sizes) if "gate" in weights else None
    h = _activation(mlp, matmul(rows, weights["up"], sizes), gate)
    return matmul(h.astype(rows.dtype), weights["down"], sizes)


def _slot_ffn(buf, weights, mlp):
    """buf [..., E, slots, embed] -> the same through expert e for every slot of e."""
    gate = jnp.einsum("...ecd,edf->...ecf", buf, weights["gate"]) if "gate" in weights else None
    h = _activation(mlp, jnp.einsum("...ecd,edf->...ecf", buf, weights["up"]), gate)
    return jnp.einsum("...ecf,efd->...ecd", h.astype(buf.dtype), weights["down"])


def _combine(out, gates):
    """out [tokens, k, embed], gates [tokens, k] -> [tokens, embed] (float32 sum)."""
    return jnp.einsum("tkd,tk->td", out.astype(jnp.float32), gates.astype(jnp.float32))


def dropless_local(x, experts, gates, weights, *, mlp, matmul, ep_axes=(), ep_size=1):
    """Dropless dispatch of one device's tokens. x [tokens, embed], experts/gates [tokens, k].

    Assignments are sorted by expert and run as one grouped matmul over the experts; an expert
    with no rows gets zero gradient. With `ep_axes` the weights hold this device's E / ep_size
    experts and assignments go to their shard by all-to-all.
    """
    t, k = experts.shape
    num_local = weights["up"].shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    rows = x[order // k]
    counts = jnp.bincount(flat, length=num_local * ep_size)  # [E]
    if ep_size == 1:
        out = _grouped_ffn(rows, counts, weights, mlp, matmul)
    else:
        out = _dropless_exchange(rows, flat[order], counts, weights, mlp, matmul, ep_axes, ep_size)
    unsorted = jnp.zeros_like(out).at[order].set(out)
    return _combine(unsorted.reshape(t, k, -1), gates)


def _dropless_exchange(rows, sorted_experts, counts, weights, mlp, matmul, ep_axes, n):
    """rows [A, embed] sorted by (global) expert -> their outputs, computed on the devices that
    hold the experts. Each device sends shard j a [A, embed] buffer (its rows for j first) and
    the per-expert row counts, so the receiver knows which local expert each row is for."""
    a, d = rows.shape
    num_local = weights["up"].shape[0]
    dest = sorted_experts // num_local
    shard_counts = counts.reshape(n, num_local)  # [shard, local expert]
    start = jnp.cumsum(shard_counts.sum(1)) - shard_counts.sum(1)
    pos = jnp.arange(a) - start[dest]  # row's index within its shard's segment
    send = jnp.zeros((n, a, d), rows.dtype).at[dest, pos].set(rows)
    recv = jax.lax.all_to_all(send, ep_axes, 0, 0)  # [source, A, embed]
    recv_counts = jax.lax.all_to_all(shard_counts, ep_axes, 0, 0)  # [source, local expert]
    # Local expert of every received row: E_l for the unused tail of a source's block.
    ends = jnp.cumsum(recv_counts, axis=1)
    local = jax.vmap(lambda e: jnp.searchsorted(e, jnp.arange(a), side="right"))(ends)
    order = jnp.argsort(local.reshape(-1), stable=True)
    flat = recv.reshape(n * a, d)[order]
    out = _grouped_ffn(flat, recv_counts.sum(0), weights, mlp, matmul)  # tail rows -> 0
    out = jnp.zeros_like(out).at[order].set(out).reshape(n, a, d)
    back = jax.lax.all_to_all(out, ep_axes, 0, 0)  # [shard, A, embed]: my rows, computed
    return back[dest, pos]


def capacity_local(x, experts, gates, slot, weights, *, mlp, cap, ep_axes=(), ep_size=1):
    """Capacity dispatch. x [batch, seq, embed]; experts/gates/slot [batch, seq, k] with slot ==
    cap for a dropped assignment (its gate then counts as 0, the residual carries the token).
    Buffers [batch, E, cap, embed]; with `ep_axes` the expert axis is split over the shards and
    exchanged by all-to-all (exactly the slots, no padding)."""
    b, s, k = experts.shape
    d = x.shape[-1]
    num_experts = weights["up"].shape[0] * ep_size
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], experts.shape)
    tokens = jnp.broadcast_to(x[:, :, None, :], (b, s, k, d))
    buf = jnp.zeros((b, num_experts, cap, d), x.dtype)
    buf = buf.at[rows, experts, slot].add(tokens, mode="drop")
    if ep_size == 1:
        out = _slot_ffn(buf, weights, mlp)
    else:
        buf = buf.reshape(b, ep_size, num_experts // ep_size, cap, d)
        recv = jax.lax.all_to_all(buf, ep_axes, 1, 1)  # [batch, source, E_l, cap, embed]
        out = jax.lax.all_to_all(_slot_ffn(recv, weights, mlp), ep_axes, 1, 1)
        out = out.reshape(b, num_experts, cap, d)
    picked = out.at[rows, experts, slot].get(mode="fill", fill_value=0)  # [b, s, k, embed]
    y = _combine(picked.reshape(b * s, k, d), gates.reshape(b * s, k))
    return y.reshape(b, s, d)


def dispatch(x, experts, gates, slot, weights, *, mlp, mode, cap, matmul):
    """Routed expert outputs y [batch, seq, embed] (float32), on the active mesh if any.

    `weights` maps gate (swiglu only), up, down to the expert stacks in the compute dtype.
    """
    names = sorted(weights)

    def local(x, experts, gates, slot, *ws, ep_axes=(), ep_size=1):
        w = dict(zip(names, ws))
        if mode == "capacity":
            return capacity_local(
                x, experts, gates, slot, w, mlp=mlp, cap=cap, ep_axes=ep_axes, ep_size=ep_size
            )
        b, s, k = experts.shape
        y = dropless_local(
            x.reshape(b * s, -1),
            experts.reshape(b * s, k),
            gates.reshape(b * s, k),
            w,
            mlp=mlp,
            matmul=matmul,
            ep_axes=ep_axes,
            ep_size=ep_size,
        )
        return y.reshape(b, s, -1)

    if slot is None:
        slot = jnp.zeros_like(experts)
    active = sharding.active_rules()
    if active is None:
        return local(x, experts, gates, slot, *[weights[n] for n in names])
    mesh, rules = active
    tok = sharding.logical_to_spec(("batch", "seq", None), rules, x.shape, mesh)
    per_k = sharding.logical_to_spec(("batch", "seq", None), rules, experts.shape, mesh)
    w_spec = sharding.logical_to_spec(("experts", None, None), rules, weights["up"].shape, mesh)
    entry = w_spec[0] if len(w_spec) else None
    ep_axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    ep_size = math.prod(mesh.shape[a] for a in ep_axes)

    def sharded(x, experts, gates, slot, *ws):
        axes = ep_axes[0] if len(ep_axes) == 1 else ep_axes
        return local(x, experts, gates, slot, *ws, ep_axes=axes, ep_size=ep_size)

    return jax.shard_map(
        sharded,
        mesh=mesh,
        in_specs=(tok, per_k, per_k, per_k, *([w_spec] * len(names))),
        out_specs=tok,
        check_vma=False,
    )(x, experts, gates, slot, *[weights[n] for n in names])
