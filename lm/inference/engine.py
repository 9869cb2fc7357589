"""The generation engine: continuous batching over a fixed number of decode slots.

One engine serves `lm sample`, evaluation's generation tasks, `lm serve` and RL rollouts.
Requests wait in a queue; each engine step (1) drops cancelled requests, (2) gives free slots to
waiting requests, (3) prefills up to `prefill_chunk` prompt tokens (a long prompt takes several
steps, one chunk each, so it does not stall the others' decoding), and (4) runs one decode step
for every slot that has its first token. A request leaves its slot as soon as it finishes, and
the next step can hand the slot to a waiting one. The compiled steps (steps.py) use static
shapes: a prompt chunk is padded to a power-of-two bucket, and the decode step always runs all
slots, so a request's tokens never depend on what else is running.

Thread model: `submit`/`cancel` may be called from any thread; `step` runs on one thread only,
either the engine's own (`start`) or the caller's (`generate` without `start`). Callbacks run on
the stepping thread.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from lm.errors import QueueFull, RequestError
from lm.inference import placement, steps
from lm.inference.requests import Output, Request, Result, SamplingParams, check_request
from lm.inference.sampling import TOP_LOGPROBS
from lm.tokenizer.vocab import prompt_start_id

__all__ = ["Engine", "Output", "QueueFull", "Result", "SamplingParams"]
log = logging.getLogger(__name__)


MIN_ATTEND = 256  # the smallest attention length a decode block compiles for


class Engine:
    """Continuous batching over `slots` decode slots of `model_cfg.max_seq_len` tokens each."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State,
        model_cfg,
        vocab,
        *,
        slots: int = 8,
        max_queue: int = 256,
        prefill_chunk: int = 256,
        decode_steps: int = 8,
        rules=None,
        prefill_budget: int | None = None,
    ):
        if slots < 1:
            raise RequestError(f"slots must be at least 1, got {slots}")
        self.graphdef, self.params, self.model_cfg, self.vocab = graphdef, params, model_cfg, vocab
        self._param_leaves, self._param_tree = jax.tree.flatten(params)
        self._graph = steps.Static(graphdef)
        self.slots, self.max_queue = slots, max_queue
        self.decode_steps = max(1, int(decode_steps))
        self.max_len = int(model_cfg.max_seq_len)
        self.chunk = min(max(16, 1 << (max(prefill_chunk, 1) - 1).bit_length()), self.max_len)
        # Prompt tokens prefilled per engine step, between decode calls: one chunk keeps the
        # running streams' inter-token latency low (serving); a batch job with no one waiting
        # on a stream (RL rollouts) raises it to prefill all its prompts before decoding.
        self.prefill_budget = max(1, prefill_budget or self.chunk)
        self.start_id = prompt_start_id(vocab)  # BOS for lm's runs; an import's own convention
        leaf = jax.tree.leaves(params)[0]
        self.mesh = leaf.sharding.mesh if isinstance(leaf.sharding, NamedSharding) else None
        self.rules = rules if rules is not None else placement.default_rules(self.mesh)
        self._batch_axis = 1 if model_cfg.scan_layers else 0
        self._cache = placement.empty_cache(self)
        s = slots
        self._tokens, self._index = np.zeros(s, np.int32), np.zeros(s, np.int32)
        self._active, self._counts = np.zeros(s, bool), np.zeros(s, np.int32)
        self._keys = np.zeros((s, 2), np.uint32)
        self._temperature, self._top_p = np.zeros(s, np.float32), np.ones(s, np.float32)
        self._top_k = np.zeros(s, np.int32)
        self._slot: list[Request | None] = [None] * s
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.generated_tokens = self.prompt_tokens = 0
        self._rng = np.random.default_rng()

    @classmethod
    def from_workdir(
        cls,
        workdir: str,
        *,
        step: int | None = None,
        weight_bits: int = 0,
        group_size: int = 128,
        **kwargs,
    ) -> Engine:
        """An engine on a run's newest (or given) checkpoint, optionally int8/int4 weights."""
        from lm.training.restore import restore_run

        return cls.from_run(
            restore_run(workdir, step), weight_bits=weight_bits, group_size=group_size, **kwargs
        )

    @classmethod
    def from_run(cls, run, *, weight_bits: int = 0, group_size: int = 128, **kwargs) -> Engine:
        """An engine on a restored run (`lm.training.restore.restore_run`), with its mesh
        rules; optionally int8/int4 weights."""
        graphdef, params, model_cfg = run.trainer.graphdef, run.params, run.model_cfg
        if weight_bits:
            from lm.quantize.weights import quantize_loaded

            graphdef, params, model_cfg = quantize_loaded(graphdef, params, weight_bits, group_size)
        kwargs.setdefault("rules", tuple(tuple(r) for r in run.cfg.mesh.rules))
        return cls(graphdef, params, model_cfg, run.vocab, **kwargs)

    def set_params(self, params: nnx.State) -> None:
        """New weights of the same shapes and shardings (an RL policy after an update); the
        compiled steps and the cache are kept. Call between `generate` calls, not while
        requests run."""
        leaves, tree = jax.tree.flatten(params)
        if tree != self._param_tree:
            raise ValueError("set_params: the params' structure differs from the engine's")
        self.params, self._param_leaves = params, leaves

    # -- requests ------------------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """The ids a text prompt runs as: the vocabulary's prompt start id (lm's runs: BOS, as
        every training document begins; an imported model: what its tokenizer adds), then the
        text's tokens."""
        return ([self.start_id] if self.start_id is not None else []) + self.vocab.encode(text)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        callback: Callable[[Output], None] | None = None,
    ) -> int:
        """Queues a request; returns its id. Raises RequestError for a request that cannot run
        (see `check_request`) and QueueFull when `max_queue` requests already wait."""
        prompt = check_request(prompt_ids, params, self.model_cfg.vocab_size, self.max_len)
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting; retry later")
            request = Request(
                next(self._ids), prompt, params, callback, self._stop_ids(params), self.vocab.decode
            )
            self._waiting.append(request)
            self._lock.notify_all()
        return request.id

    def cancel(self, request_id: int) -> None:
        """Frees the request's slot before the next decode step (its callback gets a final
        Output with finish_reason "abort"); unknown or finished ids are ignored."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify_all()

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos and self.vocab.eos_id is not None:
            ids.add(self.vocab.eos_id)
        return frozenset(ids)

    def stats(self) -> dict:
        with self._lock:
            return {
                "waiting": len(self._waiting),
                "running": sum(r is not None for r in self._slot),
                "slots": self.slots,
                "generated_tokens": self.generated_tokens,
                "prompt_tokens": self.prompt_tokens,
            }

    # -- driving -------------------------------------------------------------------------------

    def start(self) -> None:
        """Runs steps on a background thread while there is work (idle otherwise)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="lm-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._has_work():
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - logged; the requests in flight end, serving goes on
                log.exception("engine step failed; ending the requests in flight")
                self._fail_all()

    def _fail_all(self) -> None:
        """Ends every request with finish_reason "error" and starts from an empty cache (a
        failed step may have consumed the donated one)."""
        with self._lock:
            requests = [r for r in self._slot if r is not None] + list(self._waiting)
            self._waiting.clear()
            for slot in range(self.slots):
                self._free(slot)
        for request in requests:
            request.callback_output(request.finish("error"))
        self._cache = placement.empty_cache(self)

    def _has_work(self) -> bool:
        return bool(self._waiting or self._cancelled or any(r is not None for r in self._slot))

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        on_finished: Callable[[int], None] | None = None,
    ) -> list[Result]:
        """Runs every prompt to completion and returns their results in order (on the engine
        thread when started, else by stepping here). `on_finished(i)` is called as prompt i
        finishes (progress of a long batch job)."""
        many = params if isinstance(params, list) else [params] * len(prompts)
        results = [Result() for _ in prompts]
        done = threading.Semaphore(0)

        def collect(i: int) -> Callable[[Output], None]:
            def on_output(out: Output) -> None:
                results[i].add(out)
                if out.finished:
                    if on_finished is not None:
                        on_finished(i)
                    done.release()

            return on_output

        pending = list(enumerate(zip(prompts, many)))
        while pending:
            i, (prompt, p) = pending[0]
            try:
                self.submit(prompt, p, collect(i))
                pending.pop(0)
            except QueueFull:
                if self.running:
                    done.acquire()
                    done.release()
                else:
                    self.step()
        if self.running:
            for _ in prompts:
                done.acquire()
        else:
            while any(not r.finished for r in results):
                self.step()
        return results

    def step(self) -> None:
        """One round: cancellations, admissions, one prefill budget, one decode step."""
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            kept = collections.deque()
            for request in self._waiting:
                (self._abort if request.id in cancelled else kept.append)(request)
            self._waiting = kept
            for slot, request in enumerate(self._slot):
                if request is not None and request.id in cancelled:
                    self._free(slot)
                    self._abort(request)
            for slot in range(self.slots):
                if self._slot[slot] is None and self._waiting:
                    self._assign(slot, self._waiting.popleft())
        self._prefill_some()
        if self._active.any():
            self._decode()

    # -- slots ---------------------------------------------------------------------------------

    def _assign(self, slot: int, request: Request) -> None:
        p = request.params
        self._slot[slot] = request
        request.slot = slot
        seed = p.seed if p.seed is not None else int(self._rng.integers(2**31 - 1))
        self._keys[slot] = np.asarray(jax.random.key_data(jax.random.PRNGKey(seed % 2**63)))
        self._temperature[slot], self._top_p[slot] = p.temperature, p.top_p
        self._top_k[slot], self._counts[slot] = min(p.top_k, self.model_cfg.vocab_size), 0
        self._active[slot] = False

    def _free(self, slot: int) -> None:
        self._slot[slot] = None
        self._active[slot] = False

    def _abort(self, request: Request) -> None:
        request.callback_output(request.finish("abort"))

    def _prefill_some(self) -> None:
        budget = self.prefill_budget
        for slot, request in enumerate(self._slot):
            while request is not None and not self._active[slot] and budget > 0:
                budget -= self._prefill_chunk(slot, request)
                if self._slot[slot] is None:
                    break

    def _prefill_chunk(self, slot: int, request: Request) -> int:
        prompt, start = request.prompt, request.cursor
        n = min(len(prompt) - start, self.chunk)
        bucket = min(steps.bucket_length(n, self.chunk), self.max_len - start)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = prompt[start : start + n]
        following = np.zeros(bucket, np.int32)
        after = prompt[start + 1 : start + n + 1]  # each position's next prompt token
        following[: len(after)] = after
        p = request.params
        with_prompt = p.prompt_logprobs is not None
        with_top = bool(p.logprobs) or bool(p.prompt_logprobs)
        key = jax.random.fold_in(jax.random.wrap_key_data(self._keys[slot]), 0)
        inputs = (slot, tokens, following, start, n, jax.random.key_data(key))
        inputs += (self._temperature[slot], self._top_k[slot], self._top_p[slot])
        with placement.step_rules(self.mesh, self.rules, one_row=True):
            self._cache, *out = steps.prefill(
                self._graph,
                self._param_leaves,
                self._cache,
                *placement.to_devices(self.mesh, inputs),
                param_tree=self._param_tree,
                batch_axis=self._batch_axis,
                with_prompt_logprobs=with_prompt,
                with_top=with_top,
            )
        token, chosen, top, prompt_lp, prompt_top = placement.to_host(out)
        if with_prompt:
            request.add_prompt_logprobs(prompt_lp[: n - (start + n == len(prompt))], prompt_top)
        request.cursor += n
        self.prompt_tokens += n
        if request.cursor == len(prompt):  # the last chunk: its last position gave a token
            self._index[slot], self._tokens[slot] = len(prompt), token[0]
            self._active[slot] = True
            self._counts[slot] = 1
            self._emit(slot, request, int(token[0]), float(chosen[0]), _row_top(top, 0))
        return bucket

    def _decode(self) -> None:
        """One block of `decode_steps` tokens for every decoding slot; a request that ends
        inside the block keeps its tokens up to its end (the rest are dropped)."""
        k = self.decode_steps
        with_top = any(r is not None and r.params.logprobs for r in self._slot)
        reach = int(self._index[self._active].max()) + k  # positions the block may write
        attend = steps.bucket_length(reach, self.max_len, MIN_ATTEND)
        inputs = (self._tokens, self._index, self._active, self._keys, self._counts)
        inputs += (self._temperature, self._top_k, self._top_p)
        with placement.step_rules(self.mesh, self.rules):
            self._cache, *out = steps.decode(
                self._graph,
                self._param_leaves,
                self._cache,
                *placement.to_devices(self.mesh, inputs),
                param_tree=self._param_tree,
                with_top=with_top,
                num_steps=k,
                attend_len=attend,
                slot_axis=self._batch_axis + 1,
            )
        tokens, chosen, top = placement.to_host(out)
        running = list(np.flatnonzero(self._active))
        for j in range(k):
            top_j = None if top is None else (top[0][j], top[1][j])
            for slot in running:
                request = self._slot[slot]
                if request is None or request.done:
                    continue
                self._index[slot] += 1
                self._tokens[slot] = tokens[j, slot]
                self._counts[slot] += 1
                token, logprob = int(tokens[j, slot]), float(chosen[j, slot])
                self._emit(slot, request, token, logprob, _row_top(top_j, slot))

    def _emit(self, slot: int, request: Request, token: int, logprob: float, top) -> None:
        self.generated_tokens += 1
        out = request.add_token(token, logprob, top, self._index[slot] >= self.max_len)
        if out.finished:
            with self._lock:
                self._free(slot)
        request.callback_output(out)


def _row_top(top, row: int) -> dict[int, float] | None:
    if top is None:
        return None
    values, ids = top
    k = min(TOP_LOGPROBS, values.shape[-1])
    return {int(ids[row, j]): float(values[row, j]) for j in range(k)}
