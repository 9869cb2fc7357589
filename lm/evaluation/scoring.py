"""Log-likelihood of continuations: the scoring math behind `lm eval` (no lm-eval import).

A request is (context ids, continuation ids). Like lm-evaluation-harness's causal models, the
model reads `(context + continuation)[-(max_len + 1):][:-1]` (the left is cut when too long,
the continuation is always kept) and the last `len(continuation)` positions' next-token
logprobs are summed. `is_greedy` says every continuation token is its position's argmax.

Why batched this way: requests are sorted by length and cut into batches of `batch_size`
rows, each right-padded to a power-of-two bucket (>= 16, <= max_len), so one jitted forward
is compiled per bucket length rather than per request. Padding has segment id 0 and sits to
the right of every real token, so the causal mask keeps it from changing any real position.
With a mesh the params stay where they are (sharded) and the rows are split over the batch
axes; the activation-sharding rules apply inside the trace.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lm import sharding
from lm.errors import LMError
from lm.inference.steps import bucket_length

Request = tuple[Sequence[int], Sequence[int]]


def model_inputs(
    context: Sequence[int], continuation: Sequence[int], max_len: int
) -> tuple[list[int], list[int], int]:
    """(input ids, target ids, n scored) of one request; inputs and targets have equal length
    <= max_len and the last `n scored` targets are the continuation."""
    if not continuation:
        raise LMError("a continuation to score must have at least one token")
    if not context:
        raise LMError("a context to score against must have at least one token (the start id)")
    if len(continuation) > max_len:
        raise LMError(
            f"a continuation of {len(continuation)} tokens does not fit the model's "
            f"{max_len}-token context"
        )
    whole = (list(context) + list(continuation))[-(max_len + 1) :]
    return whole[:-1], whole[1:], len(continuation)


def _forward_scores(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    targets: jax.Array,
    scored: jax.Array,
    lengths: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """tokens/targets [batch, bucket], scored/lengths [batch] -> (sum logprob [batch],
    is_greedy [batch]) over positions lengths - scored .. lengths - 1."""
    model = nnx.merge(graphdef, params)
    batch, bucket = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(bucket, dtype=jnp.int32), (batch, bucket))
    real = positions < lengths[:, None]
    logits, _ = model(tokens, positions, real.astype(jnp.int32))  # [batch, bucket, vocab]
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    logprobs = target_logits - jax.nn.logsumexp(logits, axis=-1)  # [batch, bucket]
    in_continuation = real & (positions >= (lengths - scored)[:, None])
    total = jnp.sum(jnp.where(in_continuation, logprobs, 0.0), axis=-1)
    hits = jnp.argmax(logits, axis=-1) == targets
    greedy = jnp.all(hits | ~in_continuation, axis=-1)
    return total, greedy


@functools.lru_cache(maxsize=16)
def _compiled(graphdef: nnx.GraphDef, mesh: Mesh | None, rules: tuple | None):
    """One jitted scorer per (model, mesh, rules); shapes retrace per bucket inside it."""
    if mesh is None:
        return jax.jit(functools.partial(_forward_scores, graphdef))

    def traced(params, *arrays):
        with sharding.activation_sharding(mesh, rules):
            return _forward_scores(graphdef, params, *arrays)

    return jax.jit(traced, out_shardings=NamedSharding(mesh, PartitionSpec()))


def _frozen_rules(rules: Sequence) -> tuple:
    """Config rules (lists from JSON) as nested tuples, so they can key the compile cache."""
    return tuple(
        (name, tuple(target) if isinstance(target, (list, tuple)) else target)
        for name, target in rules
    )


class ContinuationScorer:
    """Scores (context, continuation) requests with one model's params, batched and jitted.

    `mesh`/`rules`: the mesh the params are sharded on and its logical-axis rules (as in the
    run's config); None scores on the params' single device.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        max_len: int,
        *,
        batch_size: int = 16,
        mesh: Mesh | None = None,
        rules: Sequence | None = None,
    ):
        if batch_size < 1:
            raise LMError(f"batch_size must be at least 1, got {batch_size}")
        self.graphdef, self.params, self.max_len = graphdef, params, int(max_len)
        self.mesh = mesh
        self.rules = None if rules is None else _frozen_rules(rules)
        self.row_sharding, self.row_shards = None, 1
        if mesh is not None:
            self.row_sharding = sharding.batch_sharding(mesh, self.rules)
            self.row_shards = self._row_shards(self.row_sharding)
        self.batch_rows = math.ceil(batch_size / self.row_shards) * self.row_shards
        self._fn = _compiled(graphdef, mesh, self.rules)

    def _row_shards(self, row_sharding: NamedSharding) -> int:
        """How many pieces the batch axis is cut into (rows must divide by it)."""
        spec = row_sharding.spec
        names = spec[0] if len(spec) else None
        names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
        return math.prod(self.mesh.shape[n] for n in names)

    def _device(self, host: np.ndarray) -> jax.Array:
        if self.row_sharding is None:
            return jnp.asarray(host)
        spec = self.row_sharding.spec
        row_spec = NamedSharding(self.mesh, PartitionSpec(*spec[: host.ndim]))
        return jax.make_array_from_callback(host.shape, row_spec, lambda index: host[index])

    def score(
        self, requests: Sequence[Request], progress: Callable[[int], None] | None = None
    ) -> list[tuple[float, bool]]:
        """(sum of continuation logprobs, is_greedy) for each request, in the given order;
        `progress(done)` after each batch (requests scored so far)."""
        prepared = [model_inputs(c, t, self.max_len) for c, t in requests]
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(prepared)
        for start in range(0, len(order), self.batch_rows):
            chunk = order[start : start + self.batch_rows]
            bucket = bucket_length(len(prepared[chunk[0]][0]), self.max_len)
            tokens = np.zeros((self.batch_rows, bucket), np.int32)
            targets = np.zeros((self.batch_rows, bucket), np.int32)
            scored = np.zeros((self.batch_rows,), np.int32)
            lengths = np.zeros((self.batch_rows,), np.int32)
            for row, i in enumerate(chunk):
                inputs, outputs, n = prepared[i]
                tokens[row, : len(inputs)] = inputs
                targets[row, : len(outputs)] = outputs
                scored[row], lengths[row] = n, len(inputs)
            arrays = [self._device(a) for a in (tokens, targets, scored, lengths)]
            totals, greedy = self._fn(self.params, *arrays)
            totals, greedy = np.asarray(totals), np.asarray(greedy)
            for row, i in enumerate(chunk):
                results[i] = (float(totals[row]), bool(greedy[row]))
            if progress is not None:
                progress(start + len(chunk))
        return results


def score_continuations(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    requests: Sequence[Request],
    max_len: int,
    *,
    batch_size: int = 16,
    mesh: Mesh | None = None,
    rules: Sequence | None = None,
) -> list[tuple[float, bool]]:
    """(sum logprob, is_greedy) of each (context ids, continuation ids) request; see
    `ContinuationScorer`. The compiled forward is cached per (graphdef, mesh, rules)."""
    scorer = ContinuationScorer(
        graphdef, params, max_len, batch_size=batch_size, mesh=mesh, rules=rules
    )
    return scorer.score(requests)
