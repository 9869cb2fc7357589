"""Train state, the loss, and the jit-compiled train and eval steps with explicit shardings.

A batch is a dict of `[batch, seq]` arrays: inputs, targets, segment_ids, positions, weights (and
`prefix` for the prefix-LM objective); see lm/data/grain_pipeline.py.
The train step is a pure function `(state, batch) -> (state, metrics)`; the state is donated, and
its sharding (from the config's logical-axis rules) is the same on the way in and out.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm import sharding
from lm.models.layers import moe
from lm.models.transformer import ModelConfig, Transformer
from lm.quantize.training import maybe_quantize_for_training
from lm.training.objectives import LanguageModelObjective, Objective, lm_loss_sums
from lm.training.optimizer import lr_schedule, make_optimizer, schedule_count


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint needs to continue training bit for bit."""

    step: jax.Array  # int32 []
    params: nnx.State
    opt_state: Any
    loss_ema: jax.Array  # float32 []: running mean of accepted losses, for the spike guard


def abstract_model(
    model_cfg: ModelConfig, seed: int = 0, quant: Any = None
) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only params (with their `axes` metadata); allocates nothing.

    `quant` (the config's quant group): quant.training=int8|fp8 gives the qwix-wrapped model's
    graphdef (lm/quantize/training.py), whose forward pass, wherever it is merged, runs
    quantized matmuls; the params are unchanged."""
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(seed)))
    model = maybe_quantize_for_training(model, quant, model_cfg.loss_chunk)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def loss_sums(
    graphdef: nnx.GraphDef, params: nnx.State, batch: dict, dropout_key: jax.Array | None
) -> tuple[jax.Array, jax.Array, dict]:
    """The language-model loss of `lm_loss_sums` for a (graphdef, params) pair."""
    return lm_loss_sums(nnx.merge(graphdef, params), batch, dropout_key)


def _split(model: nnx.Module, trainable: Any) -> tuple[nnx.GraphDef, nnx.State, Any]:
    """(graphdef, trainable params, frozen params or None): every Param trains by default;
    with a narrower filter (LoRA adapters) the other Params are frozen."""
    if trainable is nnx.Param:
        graphdef, params = nnx.split(model, nnx.Param)
        return graphdef, params, None
    return nnx.split(model, trainable, nnx.Param)


class Trainer:
    """Builds the sharded state and the compiled steps for one config on one mesh.

    `objective` (lm/training/objectives.py) is the pluggable part: the model, which of its
    params train, the batch and the loss; the default is the language-model objective of
    `data.objective`. Params outside the trainable set (a LoRA base) are `frozen`: passed to
    every step, sharded by the same rules, never given to the optimizer."""

    def __init__(self, cfg, model_cfg: ModelConfig, mesh: Mesh, objective: Objective | None = None):
        self.cfg, self.model_cfg, self.mesh = cfg, model_cfg, mesh
        self.objective = objective or LanguageModelObjective(cfg.data.objective)
        self.rules = tuple(tuple(r) for r in cfg.mesh.rules)
        self.tx = make_optimizer(cfg.optim, cfg.train.steps)
        self.schedule = lr_schedule(cfg.optim, cfg.train.steps)
        model = nnx.eval_shape(lambda: self.build_model(nnx.Rngs(cfg.seed)))
        self.graphdef, abstract_params, abstract_frozen = _split(model, self.objective.trainable)
        replicated = NamedSharding(mesh, PartitionSpec())
        param_shardings = sharding.state_shardings(abstract_params, mesh, self.rules)
        self.frozen_shardings = (
            None
            if abstract_frozen is None
            else sharding.state_shardings(abstract_frozen, mesh, self.rules)
        )
        self.abstract_frozen = abstract_frozen
        self.frozen = None  # set_frozen() places the frozen params (a LoRA run's base)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        opt_shardings = optax.tree_map_params(
            self.tx,
            lambda _, s: s,
            abstract_opt,
            param_shardings,
            transform_non_params=lambda _: replicated,
        )
        self.state_shardings = TrainState(
            step=replicated, params=param_shardings, opt_state=opt_shardings, loss_ema=replicated
        )
        self.batch_sharding = sharding.batch_sharding(mesh, self.rules)
        self.batch_spec = self.objective.batch_spec(cfg)
        self.batch_keys = tuple(self.batch_spec)
        self.batch_shardings = {
            k: self._row_sharding(len(s)) for k, (s, _) in self.batch_spec.items()
        }
        self.stacked_batch_shardings = {
            k: NamedSharding(mesh, PartitionSpec(None, *v.spec))
            for k, v in self.batch_shardings.items()
        }
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(self._init),
            self.state_shardings,
        )
        self._train_step = jax.jit(
            self._with_rules(self._step),
            in_shardings=(self.state_shardings, self.frozen_shardings, self.batch_shardings),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )

        # `train.steps_per_call` steps in one call: batches stacked [steps, batch, ...].
        def steps(state, frozen, batches):
            return jax.lax.scan(lambda s, b: self._step(s, frozen, b), state, batches)

        self._train_steps = jax.jit(
            self._with_rules(steps),
            in_shardings=(
                self.state_shardings,
                self.frozen_shardings,
                self.stacked_batch_shardings,
            ),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        self._eval_step = jax.jit(
            self._with_rules(self._eval),
            in_shardings=(param_shardings, self.frozen_shardings, self.batch_shardings),
            out_shardings=replicated,
        )

    def _row_sharding(self, row_rank: int) -> NamedSharding:
        """Sharding of a `[batch, *row]` feature: the batch axis as the batch rules say."""
        logical = ("batch", "seq") if row_rank == 1 else ("batch",) + (None,) * row_rank
        return NamedSharding(self.mesh, sharding.logical_to_spec(logical, self.rules))

    # -- state ---------------------------------------------------------------------------------

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        model = self.objective.build(self.model_cfg, rngs)
        return maybe_quantize_for_training(model, self.cfg.get("quant"), self.model_cfg.loss_chunk)

    def _fresh_state(self, params: nnx.State) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            loss_ema=jnp.zeros((), jnp.float32),
        )

    def _init(self) -> TrainState:
        model = self.build_model(nnx.Rngs(self.cfg.seed))
        return self._fresh_state(_split(model, self.objective.trainable)[1])

    def init_state(self) -> TrainState:
        """Fresh state, created directly in its sharded layout (no host-side full copy)."""
        return jax.jit(self._init, out_shardings=self.state_shardings)()

    def state_from_params(self, params: nnx.State) -> TrainState:
        """Step-0 state whose trainable params are `params` (fine-tuning from a checkpoint)."""
        return jax.jit(self._fresh_state, out_shardings=self.state_shardings)(params)

    def set_frozen(self, frozen: nnx.State) -> None:
        """Places the frozen params (a LoRA run's base weights) for every later step."""
        self.frozen = jax.device_put(frozen, self.frozen_shardings)

    def merge(self, params: nnx.State, frozen: Any = None) -> nnx.Module:
        """The model of `params` (plus the frozen params, if any)."""
        frozen = self.frozen if frozen is None else frozen
        if frozen is None:
            return nnx.merge(self.graphdef, params)
        return nnx.merge(self.graphdef, params, frozen)

    # -- steps ---------------------------------------------------------------------------------

    def _with_rules(self, fn):
        """`fn` tracing under the activation-sharding rules. Entering the rules inside the traced
        function (not around each call) keeps per-step dispatch on jit's fast path: a context
        entered at every call cost ~4-5 ms of host time per CPU step, and a retrace (a new
        shape, e.g. during sequence-length warmup) can never miss the rules."""

        def traced(*args):
            with sharding.activation_sharding(self.mesh, self.rules):
                return fn(*args)

        return traced

    def _step(self, state: TrainState, frozen: Any, batch: dict) -> tuple[TrainState, dict]:
        cfg = self.cfg
        accum = cfg.optim.grad_accum_steps
        key = None
        if self.model_cfg.dropout > 0 or self.objective.needs_key:
            key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), state.step)

        def summed_loss(params, b, k):
            out = self.objective.loss(self.merge(params, frozen), b, k)
            return out.objective, (out.loss, out.weight, out.metrics)

        # Gradients of the summed loss; dividing by the total weight afterwards makes the
        # accumulated update equal to the large-batch update.
        grad_fn = jax.grad(summed_loss, has_aux=True)

        def micro(carry, xs):
            grads_acc, loss_acc, weight_acc, metrics_acc = carry
            mb, idx = xs
            mkey = None if key is None else jax.random.fold_in(key, idx)
            grads, (loss_sum, weight_sum, metrics) = grad_fn(state.params, mb, mkey)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            metrics_acc = jax.tree.map(jnp.add, metrics_acc, metrics)
            return (grads_acc, loss_acc + loss_sum, weight_acc + weight_sum, metrics_acc), None

        if accum > 1:
            # Row r goes to micro-batch r % accum, so each device keeps its own rows.
            def split(x):
                return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)

            micro_batches = {k: split(batch[k]) for k in self.batch_keys}
            first = {k: v[0] for k, v in micro_batches.items()}
            shapes = jax.eval_shape(grad_fn, state.params, first, key)
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
            carry = (zeros[0], zeros[1][0], zeros[1][1], zeros[1][2])
            (grads, loss_sum, weight_sum, metrics), _ = jax.lax.scan(
                micro, carry, (micro_batches, jnp.arange(accum))
            )
        else:
            grads, (loss_sum, weight_sum, metrics) = grad_fn(state.params, batch, key)

        denom = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        metrics = {n: v / denom for n, v in metrics.items()}  # weighted mean over micro-batches
        grad_norm = optax.global_norm(grads)

        # Loss-spike / NaN guard: a bad update is skipped and the old params kept.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        spike = (cfg.optim.spike_factor > 0) & (state.loss_ema > 0)
        spike = spike & (loss > cfg.optim.spike_factor * state.loss_ema)
        ok = finite & ~spike

        def update(operands):
            params, opt_state, grads = operands
            updates, new_opt = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        # A conditional rather than `where(ok, new, old)` on every leaf: with the where, XLA
        # recomputes each Adam moment inside the param update's fusion and, since the state is
        # donated, copies every old moment first (~140 extra copies, ~3 ms of a 48 ms CPU step).
        new_params, new_opt = jax.lax.cond(
            ok, update, lambda o: (o[0], o[1]), (state.params, state.opt_state, grads)
        )
        mc = self.model_cfg
        per_layer = metrics.pop(moe.PER_LAYER_LOAD, None)
        if per_layer is not None and mc.router == "sigmoid" and mc.router_bias_rate > 0:
            new_params = moe.update_router_bias(
                state.params, new_params, per_layer, mc.router_bias_rate, ok
            )
        ema = jnp.where(state.loss_ema > 0, 0.98 * state.loss_ema + 0.02 * loss, loss)
        new_state = TrainState(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt,
            loss_ema=jnp.where(ok, ema, state.loss_ema),
        )
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.schedule(schedule_count(state.opt_state)),
            "tokens": weight_sum,
            "skipped": (~ok).astype(jnp.float32),
        }
        return new_state, metrics

    def _eval(self, params: nnx.State, frozen: Any, batch: dict) -> dict:
        out = self.objective.loss(self.merge(params, frozen), batch, None)
        sums = {f"{n}_sum": v for n, v in out.metrics.items() if n != moe.PER_LAYER_LOAD}
        return {"loss_sum": out.loss, "weight_sum": out.weight, **sums}

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self._train_step(state, self.frozen, batch)

    def train_steps(self, state: TrainState, batches: dict) -> tuple[TrainState, dict]:
        """Several train steps in one call (a `lax.scan` of `train_step`): `batches` holds
        `[steps, batch, seq]` arrays and each metric comes back as `[steps]`. One dispatch per
        group saves the per-call host work (argument flattening, launch, output buffers), which
        on a 2-core CPU competes with the step itself: char_tiny 48 -> 36 ms a step."""
        return self._train_steps(state, self.frozen, batches)

    def eval_step(self, params: nnx.State, batch: dict) -> dict:
        """Summed loss, weight and objective metrics (`<name>_sum`) of one batch."""
        return self._eval_step(params, self.frozen, batch)

    def compile(self, steps: int = 1) -> Any:
        """AOT-compiles the train step (a group of `steps` steps when > 1) for the configured
        shapes; fails early on OOM."""
        lead = (self.cfg.data.batch_size,) if steps == 1 else (steps, self.cfg.data.batch_size)
        shardings = self.batch_shardings if steps == 1 else self.stacked_batch_shardings
        batch = {
            k: jax.ShapeDtypeStruct((*lead, *shape), dtype, sharding=shardings[k])
            for k, (shape, dtype) in self.batch_spec.items()
        }
        frozen = None
        if self.abstract_frozen is not None:
            frozen = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                self.abstract_frozen,
                self.frozen_shardings,
            )
        step_fn = self._train_steps if steps > 1 else self._train_step
        return step_fn.lower(self.abstract_state, frozen, batch).compile()

    def device_batch(self, local_batch: dict) -> dict:
        """Host-local numpy rows -> global jax.Arrays laid out by the batch sharding. Rows are
        `[batch, seq]` for `train_step`, or `[steps, batch, seq]` (a group of steps, stacked)
        for `train_steps`."""
        first = self.batch_keys[0]
        stacked = local_batch[first].ndim > len(self.batch_spec[first][0]) + 1
        shardings = self.stacked_batch_shardings if stacked else self.batch_shardings
        return {
            k: jax.make_array_from_process_local_data(shardings[k], local_batch[k])
            for k in self.batch_keys
        }
