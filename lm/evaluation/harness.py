"""`lm` as an lm-evaluation-harness model: every lm-eval task runs against a workdir.

Why lm-eval's own `TemplateLM`: its `loglikelihood` does the context/continuation split the
harness's scores assume (trailing spaces of the context move to the continuation; context +
continuation are encoded whole and split at the context's length; an empty context becomes
the prefix token), so our numbers are comparable with any other lm-eval model. What differs
per model is supplied here:

- tokens: `tok_encode(text)` is the vocabulary's prompt start id (if any) + `vocab.encode(text)`
  (`lm.tokenizer.vocab.prompt_start_id`): BOS for lm's own runs, the way every training
  document starts; for an imported model what its own tokenizer adds (Llama 3: BOS; GPT-2:
  nothing), as lm-eval's HFLM encodes with that tokenizer. The id packed documents start with
  (BOS, or EOS for a Hugging Face vocabulary without one) is the prefix token of an empty
  context and of rolling windows, as HFLM's is.
- `_loglikelihood_tokens`: the batched, jitted scorer of lm/evaluation/scoring.py, with the
  params sharded on the run's mesh. Too-long inputs lose their left end, keeping the
  continuation.
- `loglikelihood_rolling`: lm-eval's `get_rolling_token_windows` + `make_disjoint_window` over
  max_seq_len windows (each token predicted once, with the most context that fits).
- `generate_until`: the continuous-batching Engine (lm/inference/engine.py), greedy unless the
  task asks `do_sample`, cut before the first `until` string.

lm-eval hands over every task's requests of one kind at once; each kind runs as a stage
(`lm.stages`: "evaluating lm_py_funcname, lm_py_line (loglikelihood) 48/96 12s" live on a
terminal, timed for the report), counted as batches are scored and prompts generated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lm import stages
from lm.errors import LMError
from lm.evaluation.scoring import ContinuationScorer
from lm.tokenizer.vocab import prompt_start_id

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ModelParts:
    """What scoring and generation need: a model, its params (and the mesh they are sharded
    on, if any), its config and vocabulary."""

    graphdef: Any
    params: Any
    model_cfg: Any
    vocab: Any
    mesh: Any = None
    rules: Any = None
    step: int | None = None

    @classmethod
    def from_run(cls, run) -> ModelParts:
        """From `lm.training.restore.restore_run(...)` (params sharded on its trainer's mesh)."""
        return cls(
            run.trainer.graphdef,
            run.params,
            run.model_cfg,
            run.vocab,
            run.trainer.mesh,
            run.trainer.rules,
            run.step,
        )


def _task_names(requests) -> str:
    """ "a, b" (or "a, b, c +2 more") of the lm-eval tasks the requests come from."""
    names = sorted({str(getattr(r, "task_name", None) or "?") for r in requests})
    shown = ", ".join(names[:3])
    return shown + (f" +{len(names) - 3} more" if len(names) > 3 else "")


def _batch_size(value: Any) -> int:
    """lm-eval passes batch_size as an int, a digit string, or "auto"/"auto:N" (-> default)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise LMError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if size < 1:
        raise LMError(f"batch_size must be a positive integer, got {size}")
    return size


@register_model("lm")
class LMEvalModel(TemplateLM):
    """An lm run as an lm-eval `LM`.

    From lm-eval's side: `--model lm --model_args workdir=W,step=N,batch_size=B,slots=S`.
    From Python: `LMEvalModel.from_run(restored_run)`, `.from_engine(engine)` or
    `.from_parts(...)`, which reuse params already in memory instead of reloading.
    """

    backend = "causal"

    def __init__(
        self,
        workdir: str | None = None,
        step: int | None = None,
        batch_size: int | str | None = DEFAULT_BATCH_SIZE,
        slots: int = 8,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        seed: int = 0,
        parts: ModelParts | None = None,
        engine: Any = None,
        **ignored: Any,  # lm-eval also passes device / max_batch_size
    ):
        super().__init__()
        if parts is None:
            if not workdir:
                raise LMError("the lm model needs model_args workdir=W (an `lm train` run)")
            from lm.training.restore import restore_run

            parts = ModelParts.from_run(
                restore_run(str(workdir), None if step is None else int(step))
            )
        self.parts = parts
        self.vocab = parts.vocab
        self.max_length = int(parts.model_cfg.max_seq_len)
        self.batch_size = _batch_size(batch_size)
        self.slots = int(slots)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self._engine = engine
        self._stage: stages.Stage | None = None
        self._lm_eval_stage = contextlib.ExitStack()  # lm-eval's own work before our requests
        self.requests_ended: float | None = None  # time.monotonic() as the last kind ended
        self.scorer = ContinuationScorer(
            parts.graphdef,
            parts.params,
            self.max_length,
            batch_size=self.batch_size,
            mesh=parts.mesh,
            rules=parts.rules,
        )

    @classmethod
    def from_run(cls, run, **kwargs: Any) -> LMEvalModel:
        """From a `RestoredRun`, without reloading its checkpoint."""
        return cls(parts=ModelParts.from_run(run), **kwargs)

    @classmethod
    def from_parts(cls, parts: ModelParts, **kwargs: Any) -> LMEvalModel:
        return cls(parts=parts, **kwargs)

    @classmethod
    def from_engine(cls, engine, *, step: int | None = None, **kwargs: Any) -> LMEvalModel:
        """Scores with an Engine's params and generates with the Engine itself."""
        parts = ModelParts(
            engine.graphdef,
            engine.params,
            engine.model_cfg,
            engine.vocab,
            engine.mesh,
            engine.rules,
            step,
        )
        return cls(parts=parts, engine=engine, **kwargs)

    # -- tokens --------------------------------------------------------------------------------

    @property
    def start_id(self) -> int:
        """The id packed training documents start with (an empty context's prefix)."""
        start = getattr(self.vocab, "start_id", self.vocab.bos_id)
        if start is None:
            raise LMError("the vocabulary has neither a BOS nor a start id to begin contexts with")
        return int(start)

    @property
    def prompt_start_id(self) -> int | None:
        """The id put before an encoded context, or None (see `prompt_start_id`)."""
        return prompt_start_id(self.vocab)

    @property
    def eot_token_id(self) -> int:
        return int(self.vocab.eos_id)

    @property
    def prefix_token_id(self) -> int:
        return self.start_id

    @property
    def tokenizer_name(self) -> str:
        return f"lm-{self.vocab.digest[:16]}"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        """`[prompt start id] + ids` (the bare ids for a vocabulary that adds none), or the
        bare ids when add_special_tokens is False (lm-eval's continuation of an empty
        context)."""
        ids = list(self.vocab.encode(string))
        start = self.prompt_start_id
        return ids if add_special_tokens is False or start is None else [start, *ids]

    def tok_decode(self, ids: list[int]) -> str:
        return self.vocab.decode(ids)

    # -- progress --------------------------------------------------------------------------------

    def preparing(self, name: str = "preparing the requests (lm-eval)") -> None:
        """Opens a stage for lm-eval's work before it hands over requests (documents, few-shot
        contexts); the first request kind ends it, or `end_preparing()`."""
        self.end_preparing()
        self._lm_eval_stage.enter_context(stages.stage(name))

    def end_preparing(self) -> None:
        self._lm_eval_stage.close()

    @contextlib.contextmanager
    def _evaluating(self, requests, kind: str) -> Iterator[stages.Stage]:
        """A stage "evaluating <tasks> (<kind>)" over `requests` (lm-eval Instances)."""
        self.end_preparing()
        name = f"evaluating {_task_names(requests)} ({kind})"
        with stages.stage(name, total=len(requests)) as current:
            current.update(0)
            self._stage = current
            try:
                yield current
            finally:
                self._stage = None
                self.requests_ended = time.monotonic()

    def _progress(self, done: int, total: int | None = None) -> None:
        if self._stage is not None:
            self._stage.update(done, total)

    # -- loglikelihood -------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        with self._evaluating(requests, "loglikelihood"):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = True, **kwargs):
        """requests: [((context, continuation), context ids, continuation ids)]."""
        total = len(requests)
        results = self.scorer.score(
            [(ctx, cont) for _, ctx, cont in requests], lambda done: self._progress(done, total)
        )
        for (strings, _, _), result in zip(requests, results, strict=True):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """(context ids, scored ids) windows covering every token of `text` exactly once."""
        windows = get_rolling_token_windows(
            token_list=self.tok_encode(text, add_special_tokens=False),
            prefix_token=self.prefix_token_id,
            max_seq_len=self.max_length,
            context_len=1,
        )
        return [make_disjoint_window(w) for w in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = True) -> list[float]:
        """Total logprob of each whole text (windows of all texts are scored together)."""
        texts = [req.args[0] for req in requests]
        per_text = [self.rolling_windows(text) for text in texts]
        flat = [w for windows in per_text for w in windows]
        with self._evaluating(requests, "rolling loglikelihood"):
            # Counted in windows (a text is one or more), the unit batches are scored in.
            scores = iter(self.scorer.score(flat, lambda done: self._progress(done, len(flat))))
        out = []
        for text, windows in zip(texts, per_text, strict=True):
            total = sum(next(scores)[0] for _ in windows)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # -- generation ----------------------------------------------------------------------------

    @property
    def engine(self):
        """The generation Engine, built on first use from the same params."""
        if self._engine is None:
            from lm.inference.engine import Engine

            p = self.parts  # the engine finds the mesh on the params' shardings
            # Slots rounded up to a multiple of the batch shards, so the KV cache is split over
            # them (the engine would replicate it otherwise).
            shards = self.scorer.row_shards
            slots = -(-self.slots // shards) * shards
            self._engine = Engine(
                p.graphdef, p.params, p.model_cfg, p.vocab, slots=slots, rules=p.rules
            )
        return self._engine

    def sampling_params(self, gen_kwargs: dict, index: int):
        """lm-eval generation kwargs -> (SamplingParams, until strings)."""
        from lm.inference.engine import SamplingParams

        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = [s for s in kwargs.pop("until") if s]
        max_tokens = max(1, min(int(kwargs.pop("max_gen_toks")), self.max_length - 1))
        sample = bool(kwargs.get("do_sample"))
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_p=float(kwargs.get("top_p") or 1.0) if sample else 1.0,
            top_k=int(kwargs.get("top_k") or 0) if sample else 0,
            seed=self.seed + index,
            stop=tuple(until),
        )
        return params, until

    def generate_until(self, requests, disable_tqdm: bool = True) -> list[str]:
        """Each request's continuation, cut before its first `until` string. Contexts keep
        their last `max_len - max_gen_toks` tokens (as lm-eval's HFLM does)."""
        prompts, params, stops = [], [], []
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args
            sampling, until = self.sampling_params(gen_kwargs, index)
            ids = self.tok_encode(context) or [self.prefix_token_id]
            room = self.max_length - sampling.max_tokens
            prompts.append(ids[-room:] if len(ids) > room else ids)
            params.append(sampling)
            stops.append(until)
        if not prompts:
            return []
        finished = 0

        def count(_: int) -> None:
            nonlocal finished
            finished += 1
            self._progress(finished)

        with self._evaluating(requests, "generate_until"):
            results = self.engine.generate(prompts, params, on_finished=count)
        out = []
        for req, result, until in zip(requests, results, stops, strict=True):
            text = postprocess_generated_text(result.text, until, None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out
