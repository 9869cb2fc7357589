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
from lm.data.grain_pipeline import batch_features
from lm.models.layers import moe
from lm.models.loss import chunked_cross_entropy
from lm.models.transformer import ModelConfig, Transformer
from lm.quantize.training import maybe_quantize_for_training
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
    """Summed token cross-entropy (nats), summed weights, and the MoE aux of the forward pass
    averaged over MoE layers (`moe.reduce_layers`; {} for a dense model)."""
    model = nnx.merge(graphdef, params)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"], None, None, dropout_key)
    weights = batch["weights"].astype(jnp.float32)
    chunk = model.cfg.loss_chunk
    aux: dict = {}
    if model.cfg.num_experts > 0:
        hidden, _, layer_aux = model.hidden_and_aux(*args, batch.get("prefix"))
        aux = moe.reduce_layers(layer_aux)
    elif chunk > 0:
        hidden, _ = model.hidden(*args, batch.get("prefix"))
    if chunk > 0:
        # Logits one chunk of positions at a time, recomputed in the backward pass.
        matrix, layout = model.head_matrix()
        loss_sum = chunked_cross_entropy(
            hidden, matrix, layout, batch["targets"], weights, chunk, model.cfg.final_logit_softcap
        )
        return loss_sum, jnp.sum(weights), aux
    if model.cfg.num_experts > 0:
        logits = model.logits(hidden)
    else:
        logits, _ = model(*args, batch.get("prefix"))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(losses * weights), jnp.sum(weights), aux


class Trainer:
    """Builds the sharded state and the compiled steps for one config on one mesh."""

    def __init__(self, cfg, model_cfg: ModelConfig, mesh: Mesh):
        self.cfg, self.model_cfg, self.mesh = cfg, model_cfg, mesh
        self.rules = tuple(tuple(r) for r in cfg.mesh.rules)
        self.tx = make_optimizer(cfg.optim, cfg.train.steps)
        self.schedule = lr_schedule(cfg.optim, cfg.train.steps)
        self.graphdef, abstract_params = abstract_model(model_cfg, cfg.seed, cfg.get("quant"))
        replicated = NamedSharding(mesh, PartitionSpec())
        param_shardings = sharding.state_shardings(abstract_params, mesh, self.rules)
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
        self.batch_keys = batch_features(cfg.data.objective)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(self._init),
            self.state_shardings,
        )
        self._train_step = jax.jit(
            self._with_rules(self._step),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        # `train.steps_per_call` steps in one call: batches stacked [steps, batch, seq].
        self.stacked_batch_sharding = NamedSharding(
            mesh, PartitionSpec(None, *self.batch_sharding.spec)
        )
        self._train_steps = jax.jit(
            self._with_rules(lambda state, batches: jax.lax.scan(self._step, state, batches)),
            in_shardings=(self.state_shardings, self.stacked_batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        self._eval_step = jax.jit(
            self._with_rules(self._eval),
            in_shardings=(param_shardings, self.batch_sharding),
            out_shardings=replicated,
        )

    # -- state ---------------------------------------------------------------------------------

    def _init(self) -> TrainState:
        model = Transformer(self.model_cfg, rngs=nnx.Rngs(self.cfg.seed))
        params = nnx.state(model, nnx.Param)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            loss_ema=jnp.zeros((), jnp.float32),
        )

    def init_state(self) -> TrainState:
        """Fresh state, created directly in its sharded layout (no host-side full copy)."""
        return jax.jit(self._init, out_shardings=self.state_shardings)()

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

    def _step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        cfg = self.cfg
        accum = cfg.optim.grad_accum_steps
        key = None
        if self.model_cfg.dropout > 0:
            key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), state.step)

        def summed_loss(params, b, k):
            # The optimized objective adds the weighted MoE aux losses (as a per-token mean,
            # scaled like the summed cross-entropy); the reported loss stays cross-entropy.
            loss_sum, weight_sum, aux = loss_sums(self.graphdef, params, b, k)
            objective = loss_sum + weight_sum * moe.aux_penalty(aux, self.model_cfg)
            return objective, (loss_sum, weight_sum, {n: v * weight_sum for n, v in aux.items()})

        # Gradients of the summed loss; dividing by the total weight afterwards makes the
        # accumulated update equal to the large-batch update.
        grad_fn = jax.grad(summed_loss, has_aux=True)

        def micro(carry, xs):
            grads_acc, loss_acc, weight_acc, aux_acc = carry
            mb, idx = xs
            mkey = None if key is None else jax.random.fold_in(key, idx)
            grads, (loss_sum, weight_sum, aux) = grad_fn(state.params, mb, mkey)
            grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
            aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
            return (grads_acc, loss_acc + loss_sum, weight_acc + weight_sum, aux_acc), None

        if accum > 1:
            # Row r goes to micro-batch r % accum, so each device keeps its own rows.
            def split(x):
                return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)

            micro_batches = {k: split(batch[k]) for k in self.batch_keys}
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            aux_zeros = moe.aux_template(self.model_cfg)
            carry = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), aux_zeros)
            (grads, loss_sum, weight_sum, aux), _ = jax.lax.scan(
                micro, carry, (micro_batches, jnp.arange(accum))
            )
        else:
            grads, (loss_sum, weight_sum, aux) = grad_fn(state.params, batch, key)

        denom = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        aux = {n: v / denom for n, v in aux.items()}  # token-weighted mean over micro-batches
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
        if aux and mc.router == "sigmoid" and mc.router_bias_rate > 0:
            new_params = moe.update_router_bias(
                state.params, new_params, aux["expert_load_per_layer"], mc.router_bias_rate, ok
            )
        ema = jnp.where(state.loss_ema > 0, 0.98 * state.loss_ema + 0.02 * loss, loss)
        new_state = TrainState(
            step=state.step + 1,
            params=new_params,
            opt_state=new_opt,
            loss_ema=jnp.where(ok, ema, state.loss_ema),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": self.schedule(schedule_count(state.opt_state)),
            "tokens": weight_sum,
            "skipped": (~ok).astype(jnp.float32),
        }
        if aux:  # moe/expert_load is a vector [E]; the rest scalars
            metrics.update({f"moe/{n}": aux[n] for n in (*moe.AUX_SCALARS, "expert_load")})
        return new_state, metrics

    def _eval(self, params: nnx.State, batch: dict) -> dict:
        loss_sum, weight_sum, _ = loss_sums(self.graphdef, params, batch, None)
        return {"loss_sum": loss_sum, "weight_sum": weight_sum}

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self._train_step(state, batch)

    def train_steps(self, state: TrainState, batches: dict) -> tuple[TrainState, dict]:
        """Several train steps in one call (a `lax.scan` of `train_step`): `batches` holds
        `[steps, batch, seq]` arrays and each metric comes back as `[steps]`. One dispatch per
        group saves the per-call host work (argument flattening, launch, output buffers), which
        on a 2-core CPU competes with the step itself: char_tiny 48 -> 36 ms a step."""
        return self._train_steps(state, batches)

    def eval_step(self, params: nnx.State, batch: dict) -> dict:
        return self._eval_step(params, batch)

    def compile(self, steps: int = 1) -> Any:
        """AOT-compiles the train step (a group of `steps` steps when > 1) for the configured
        shapes; fails early on OOM."""
        shape = (self.cfg.data.batch_size, self.cfg.data.seq_len)
        sharding = self.batch_sharding
        if steps > 1:
            shape, sharding = (steps, *shape), self.stacked_batch_sharding
        batch = {
            k: jax.ShapeDtypeStruct(
                shape, jnp.float32 if k == "weights" else jnp.int32, sharding=sharding
            )
            for k in self.batch_keys
        }
        step_fn = self._train_steps if steps > 1 else self._train_step
        return step_fn.lower(self.abstract_state, batch).compile()

    def device_batch(self, local_batch: dict) -> dict:
        """Host-local numpy rows -> global jax.Arrays laid out by the batch sharding. Rows are
        `[batch, seq]` for `train_step`, or `[steps, batch, seq]` (a group of steps, stacked)
        for `train_steps`."""
        return {
            k: jax.make_array_from_process_local_data(
                self.stacked_batch_sharding if local_batch[k].ndim == 3 else self.batch_sharding,
                local_batch[k],
            )
            for k in self.batch_keys
        }
