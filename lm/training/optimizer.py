"""AdamW with warmup + cosine/linear decay, global-norm clipping and selective weight decay."""

from __future__ import annotations

import jax
import optax
from flax import nnx


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine or linear decay to `lr * min_lr_ratio` at the end."""
    peak, warmup = optim_cfg.lr, max(0, min(optim_cfg.warmup_steps, total_steps))
    floor = peak * optim_cfg.min_lr_ratio
    decay_steps = max(1, total_steps - warmup)
    if optim_cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim_cfg.min_lr_ratio)
    elif optim_cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    elif optim_cfg.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(
            f"optim.schedule must be cosine, linear or constant, got {optim_cfg.schedule!r}"
        )
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: nnx.State) -> nnx.State:
    """True for matrices that get weight decay: projection kernels and the MoE expert stacks.

    Norm scales, biases and embedding tables (token and position) are left undecayed, as in
    GPT-2/3 and Llama training, and so is the MoE `router_bias`. An expert stack is a Param held
    directly as a MoE layer's `gate`/`up`/`down` ([E, ...], lm/models/layers/moe.py), where a
    dense MLP's are Dense modules with a `kernel`.
    """

    def is_kernel(path, _) -> bool:
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        names = [n for n in names if n != "value"]
        if "kernel" in names:
            return True
        return len(names) >= 2 and names[-2] == "mlp" and names[-1] in ("gate", "up", "down")

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, decay on kernels only)."""
    chain = []
    if optim_cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(optim_cfg.clip_norm))
    chain.append(
        optax.adamw(
            lr_schedule(optim_cfg, total_steps),
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*chain)


def schedule_count(opt_state) -> jax.Array:
    """The step count the learning-rate schedule of `make_optimizer`'s state is at: the count
    of *applied* updates. A skipped update (the spike/NaN guard) leaves the optimizer state,
    this count included, untouched while the train step still advances, so the lr of the
    next applied update is `schedule(schedule_count(opt_state))`, not `schedule(step)`."""
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_sched) if is_sched(x)]
    if len(found) != 1:
        raise ValueError(f"expected one ScaleByScheduleState in the optimizer state, got {found}")
    return found[0].count
