"""Fine-tuning throughput beside pretraining on the same model shape, in one process and the
same minutes: pretraining, full SFT, LoRA SFT and GRPO (rollouts and the whole step).

Every case goes through the real pieces `lm train` / `lm finetune` use: `Trainer` with the
objective of the experiment's config (`make_objective`), params placed by
`lm.finetune.run.initial_params` (the base's weights, fresh adapters) and `state_from_params`,
and the train step AOT-compiled by `Trainer.compile` (whose `memory_analysis()` gives the
step's temp and argument bytes); the timed calls run that compiled step.

- pretrain: the `tiny` experiment's LM objective, random init, B x T rows of random ids with
  every position weighted (the step's cost does not depend on the ids).
- SFT full / LoRA: `sft_tiny` / `lora_tiny` (rank 8, alpha 16, dropout 0.05, the default
  pattern: attn q/k/v/o and mlp projections) on the same shape, rows from
  `examples.pack_conversations` of `make_data.instructions` drawn by `ArraySource`, as
  `lm finetune` does. tokens/s counts the B x T row positions (the step's shape, the same as
  pretraining); "loss tokens" are the weighted (assistant) targets per step.
- GRPO: `grpo_tiny` (8 prompts x 4 samples, 24 new tokens, temperature 1, seq 96, batch 32)
  through `RolloutSource`: `prepare` samples with the generation engine (`sample`), computes
  the rollout's and the reference's log-probs and the advantages, then the compiled train step
  runs. The rollout row is completion tokens (the stop token included when one was sampled) per
  second of `sample`; the step row is the same tokens per second of the whole step. The policy
  is the random-init base, whose `signature` rewards are all 0, so every group would be
  resampled (`rl.resample_rounds`, default 2, i.e. three rollouts a step): resampling is turned
  off here, so a step is one rollout, as when the groups' rewards differ. The rollout row also
  counts the engine's decode blocks per rollout (each is `decode_steps` tokens for every slot).

Timing: each case is compiled and warmed up first; then ROUNDS rounds run every case once
(train cases a block of STEPS_PER_BLOCK steps, GRPO one step), the order reversed on every
other round (ABCD DCBA) so that drift in the machine's load falls on all cases alike; each
block ends with `block_until_ready`. A row's time is the median over rounds, with the range;
"vs pretrain" is the median of the per-round ratios to pretraining's block of the same round.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
import types
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BATCH, SEQ = 16, 128  # the `tiny` / `sft_tiny` row shape
ROUNDS = 5
STEPS_PER_BLOCK = 3
WARMUP_STEPS = 1  # train steps (compiled ahead of time); GRPO warms up with 2 whole steps
GRPO_WARMUP_STEPS = 2
SFT_EXAMPLES = 800
PROMPTS = 400
TOKENIZER_BYTES = 2_000_000
ALL_CASES = ("pretrain", "sft", "lora", "lora_nodrop", "grpo")

# name -> (model overrides of the `tiny` experiment (vocab 2048, ctx 128, gelu, learned
# positions, tied embeddings), the cases run on it). The larger shape skips GRPO to keep
# `make bench` within a few minutes on a 2-core CPU.
SHAPES = {
    "tiny: 2L d128": (dict(num_layers=2, d_model=128, num_heads=4, d_ff=512), ALL_CASES),
    "4L d256": (
        dict(num_layers=4, d_model=256, num_heads=4, d_ff=1024),
        ("pretrain", "sft", "lora", "lora_nodrop"),
    ),
}


def tokenizer(tmp: str) -> str:
    """A BPE tokenizer (vocab 2048, the chat role tokens) trained as `lm train --experiment=tiny`
    trains one, on the first TOKENIZER_BYTES of its text."""
    from lm.config import get_config
    from lm.tokenizer.sentencepiece_tokenizer import train_tokenizer

    cfg = get_config("tiny")
    cfg.tokenizer.train_max_bytes = TOKENIZER_BYTES
    return train_tokenizer(cfg.data, cfg.tokenizer, os.path.join(tmp, "tokenizer"))


def _tree_size(tree) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree.leaves(tree))


def _tree_bytes(tree) -> int:
    import jax

    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def _memory(compiled) -> tuple[float | str, float | str]:
    """(temp MiB, argument MiB) of a compiled step, or blanks where the backend has none."""
    memory = compiled.memory_analysis()
    if memory is None:
        return "", ""
    return memory.temp_size_in_bytes / 2**20, memory.argument_size_in_bytes / 2**20


def _paired(pretrain_times: list[float], times: list[float], work: float) -> str:
    """tokens/s relative to pretraining: the median over rounds of the ratio within a round
    (the two blocks ran minutes apart at most, so the machine's load mostly cancels); `work`
    is the case's positions per step over pretraining's."""
    ratios = [work * p / t for p, t in zip(pretrain_times, times)]
    return f"{statistics.median(ratios):.2f}x"


@dataclasses.dataclass
class TrainCase:
    """One train step timed in blocks: the compiled step, its state and a few device batches."""

    name: str
    trainer: Any
    compiled: Any
    state: Any
    batches: list
    loss_tokens: float  # mean weighted targets per step
    trainable: int
    frozen: int
    opt_bytes: int
    times: list = dataclasses.field(default_factory=list)
    skipped: float = 0.0
    i: int = 0

    def run(self, steps: int) -> float:
        """Seconds per step of `steps` steps run back to back."""
        import jax

        start = time.perf_counter()
        for _ in range(steps):
            batch = self.batches[self.i % len(self.batches)]
            self.i += 1
            self.state, metrics = self.compiled(self.state, self.trainer.frozen, batch)
        jax.block_until_ready((self.state, metrics))
        self.skipped += float(metrics["skipped"])
        return (time.perf_counter() - start) / steps

    def round(self) -> None:
        self.times.append(self.run(STEPS_PER_BLOCK))

    def row(self, shape: str, pretrain_times: list[float]) -> dict:
        ms = statistics.median(self.times) * 1e3
        low, high = min(self.times) * 1e3, max(self.times) * 1e3
        tokens_per_s = BATCH * SEQ / (ms / 1e3)
        temp, args = _memory(self.compiled)
        return {
            "shape": shape,
            "case": self.name,
            "counted": f"B x T = {BATCH} x {SEQ} positions",
            "ms/step (min-max)": f"{ms:.1f} ({low:.0f}-{high:.0f})",
            "tokens/s": round(tokens_per_s),
            "vs pretrain": _paired(pretrain_times, self.times, 1.0),
            "loss tokens/step": round(self.loss_tokens),
            "trainable params": self.trainable,
            "frozen params": self.frozen,
            "optimizer state MiB": self.opt_bytes / 2**20,
            "step temp MiB": temp,
            "step args MiB": args,
        }


class GRPOCase:
    """The GRPO step of `RolloutSource.prepare` + the compiled train step, `sample` timed."""

    name = "GRPO"

    def __init__(self, cfg, trainer, compiled, state, source):
        self.cfg, self.trainer, self.compiled, self.state, self.source = (
            cfg,
            trainer,
            compiled,
            state,
            source,
        )
        self.step = 0
        self.samples: list[tuple[float, int]] = []  # (seconds, completion tokens) per call
        self.records: list[dict] = []
        sample = source.sample

        def timed_sample(*args, **kwargs):
            start = time.perf_counter()
            out = sample(*args, **kwargs)
            self.samples.append((time.perf_counter() - start, sum(len(c) for c in out[1])))
            return out

        source.sample = timed_sample
        # Engine steps that ran a decode block (each is decode_steps tokens for every slot).
        self.decode_calls = 0
        engine, decode = source.engine, source.engine._decode

        def counted_decode():
            self.decode_calls += 1
            return decode()

        engine._decode = counted_decode

    def run(self) -> dict:
        import jax

        calls, decodes = len(self.samples), self.decode_calls
        start = time.perf_counter()
        self.source.prepare(self.state, self.step)
        prepared = time.perf_counter()
        batch = self.trainer.device_batch(next(self.source))
        self.state, metrics = self.compiled(self.state, self.trainer.frozen, batch)
        jax.block_until_ready((self.state, metrics))
        end = time.perf_counter()
        self.step += 1
        rollouts = self.samples[calls:]
        sample_s = sum(s for s, _ in rollouts)
        return {
            "step_s": end - start,
            "sample_s": sample_s,
            "logps_s": prepared - start - sample_s,
            "train_s": end - prepared,
            "tokens": sum(n for _, n in rollouts),
            "rollouts": len(rollouts),
            "decode_calls": self.decode_calls - decodes,
        }

    def round(self) -> None:
        self.records.append(self.run())

    def rows(self, shape: str, pretrain_times: list[float]) -> list[dict]:
        def med(key):
            return statistics.median(r[key] for r in self.records)

        def span(key):
            values = [r[key] * 1e3 for r in self.records]
            return f"{med(key) * 1e3:.1f} ({min(values):.0f}-{max(values):.0f})"

        tokens = med("tokens")
        rl = self.cfg.finetune.rl
        train_positions = self.cfg.data.batch_size * self.cfg.data.seq_len
        temp, args = _memory(self.compiled)
        common = {
            "shape": shape,
            "loss tokens/step": round(tokens),
            "trainable params": _tree_size(self.state.params),
            "frozen params": 0,
        }
        gen = f"{rl.prompts_per_step} x {rl.group_size} x <={rl.max_new_tokens} completion tokens"
        engine = self.source.engine
        return [
            {
                **common,
                "case": (
                    f"GRPO rollout (RolloutSource.sample: {med('decode_calls'):.0f} engine "
                    f"decode blocks of {engine.decode_steps} tokens x {engine.slots} slots)"
                ),
                "counted": gen,
                "ms/step (min-max)": span("sample_s"),
                "tokens/s": round(tokens / med("sample_s")),
                "vs pretrain": "",
            },
            {
                **common,
                "case": (
                    f"GRPO step: rollout {med('sample_s') * 1e3:.0f} + rewards, log-probs, "
                    f"advantages {med('logps_s') * 1e3:.0f} + train {med('train_s') * 1e3:.0f} ms"
                ),
                "counted": gen,
                "ms/step (min-max)": span("step_s"),
                "tokens/s": round(tokens / med("step_s")),
                "vs pretrain": "",
            },
            {
                **common,
                "case": "GRPO train step only",
                "counted": f"B x T = {self.cfg.data.batch_size} x {self.cfg.data.seq_len}"
                " positions",
                "ms/step (min-max)": span("train_s"),
                "tokens/s": round(train_positions / med("train_s")),
                "vs pretrain": _paired(
                    pretrain_times,
                    [r["train_s"] for r in self.records],
                    train_positions / (BATCH * SEQ),
                ),
                "step temp MiB": temp,
                "step args MiB": args,
            },
        ]


def _pretrain_case(spm: str, shape: dict):
    """(pretraining case, its config, model config, a separate copy of its init params)."""
    import jax
    import numpy as np

    from lm import sharding
    from lm.config import get_config
    from lm.models.transformer import ModelConfig
    from lm.tokenizer.vocab import load_vocab
    from lm.training.train_step import Trainer

    cfg = get_config("tiny")
    cfg.model.update(**shape, dtype="float32")
    cfg.tokenizer.path = spm
    cfg.data.update(batch_size=BATCH, seq_len=SEQ)
    vocab = load_vocab(spm)
    model_cfg = ModelConfig.from_config(cfg.model, vocab.vocab_size)
    trainer = Trainer(cfg, model_cfg, sharding.make_mesh(cfg.mesh))
    compiled = trainer.compile()
    state = trainer.init_state()
    base_params = trainer.init_state().params  # the fine-tuning cases' "checkpoint"
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        ids = rng.integers(0, model_cfg.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
        rows = {
            "inputs": ids[:, :-1],
            "targets": ids[:, 1:],
            "segment_ids": np.ones((BATCH, SEQ), np.int32),
            "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (BATCH, SEQ)).copy(),
            "weights": np.ones((BATCH, SEQ), np.float32),
        }
        batches.append(trainer.device_batch({k: rows[k] for k in trainer.batch_keys}))
    case = TrainCase(
        "pretrain (LM objective, random init)",
        trainer,
        compiled,
        state,
        batches,
        float(BATCH * SEQ),
        _tree_size(state.params),
        0,
        _tree_bytes(state.opt_state),
    )
    jax.block_until_ready(base_params)
    return case, cfg, model_cfg, base_params


def _finetune_setup(experiment: str, base_cfg, model_cfg, base_params, **overrides):
    """(cfg, trainer, compiled step, trainable params, vocab) of a fine-tuning experiment
    started from `base_params`, as `lm finetune` builds them; `overrides` are
    {"finetune.lora.dropout": 0.0}-style config values."""
    from lm import sharding
    from lm.config import get_config
    from lm.finetune.objectives import make_objective
    from lm.finetune.run import adopt_base, initial_params, load_vocab_of
    from lm.training.setup import validate
    from lm.training.train_step import Trainer

    cfg = get_config(experiment)
    for key, value in overrides.items():
        *groups, name = key.split(".")
        node = cfg
        for group in groups:
            node = node[group]
        node[name] = value  # a new key (rl.resample_rounds) is added
    adopt_base(cfg, types.SimpleNamespace(cfg=base_cfg, model_cfg=model_cfg))
    mesh = sharding.make_mesh(cfg.mesh)
    validate(cfg, mesh)
    trainer = Trainer(cfg, model_cfg, mesh, make_objective(cfg))
    trainable, frozen = initial_params(trainer, base_params)
    if frozen is not None:
        trainer.set_frozen(frozen)
    compiled = trainer.compile()
    return cfg, trainer, compiled, trainable, load_vocab_of(cfg)


def _sft_case(
    name: str, experiment: str, base_cfg, model_cfg, base_params, **overrides
) -> TrainCase:
    from lm.finetune import examples, make_data
    from lm.finetune.run import ArraySource

    cfg, trainer, compiled, trainable, vocab = _finetune_setup(
        experiment, base_cfg, model_cfg, base_params, **overrides
    )
    assert (cfg.data.batch_size, cfg.data.seq_len) == (BATCH, SEQ)
    conversations = make_data.instructions(SFT_EXAMPLES, cfg.seed)
    arrays, _ = examples.pack_conversations(vocab, conversations, cfg.data.seq_len)
    source = ArraySource(arrays, cfg.data.batch_size, cfg.seed)
    host = [next(source) for _ in range(8)]
    state = trainer.state_from_params(trainable)
    return TrainCase(
        name,
        trainer,
        compiled,
        state,
        [trainer.device_batch(b) for b in host],
        sum(float(b["weights"].sum()) for b in host) / len(host),
        _tree_size(state.params),
        _tree_size(trainer.frozen) if trainer.frozen is not None else 0,
        _tree_bytes(state.opt_state),
    )


def _grpo_case(base_cfg, model_cfg, base_params) -> GRPOCase:
    from lm.finetune import make_data
    from lm.finetune.rollout import RolloutSource

    cfg, trainer, compiled, trainable, vocab = _finetune_setup(
        "grpo_tiny", base_cfg, model_cfg, base_params, **{"finetune.rl.resample_rounds": 0}
    )
    items, _ = make_data.load_prompt_data(cfg.finetune.data, PROMPTS, cfg.seed)
    source = RolloutSource(cfg, trainer, vocab, items, train_count=len(items))
    source.start(trainable)
    state = trainer.state_from_params(trainable)
    return GRPOCase(cfg, trainer, compiled, state, source)


def shape_rows(name: str, shape: dict, spm: str, cases: tuple[str, ...] = ALL_CASES) -> list:
    """The rows of one model shape: every case built, warmed up, then timed in rounds."""
    setup = time.perf_counter()
    pretrain, base_cfg, model_cfg, base_params = _pretrain_case(spm, shape)
    train = [pretrain]
    base = (base_cfg, model_cfg, base_params)
    if "sft" in cases:
        train.append(_sft_case("SFT full (sft_tiny)", "sft_tiny", *base))
    if "lora" in cases:
        train.append(_sft_case("SFT LoRA r8 (lora_tiny, dropout 0.05)", "lora_tiny", *base))
    if "lora_nodrop" in cases:
        train.append(
            _sft_case(
                "SFT LoRA r8, dropout 0", "lora_tiny", *base, **{"finetune.lora.dropout": 0.0}
            )
        )
    grpo = _grpo_case(*base) if "grpo" in cases else None
    del base, base_params
    for case in train:
        case.run(WARMUP_STEPS)
    for _ in range(GRPO_WARMUP_STEPS if grpo else 0):
        grpo.run()
    built = time.perf_counter() - setup
    print(f"finetune: {name}: built and warmed up in {built:.0f}s", flush=True)
    timed = train + ([grpo] if grpo else [])
    start = time.perf_counter()
    for r in range(ROUNDS):
        for case in timed if r % 2 == 0 else timed[::-1]:
            case.round()
    print(f"finetune: {name}: {ROUNDS} rounds in {time.perf_counter() - start:.0f}s", flush=True)
    detail: dict[str, Any] = {c.name: [round(t * 1e3, 1) for t in c.times] for c in train}
    if grpo:
        detail["GRPO"] = [{k: round(v, 4) for k, v in r.items()} for r in grpo.records]
    print(f"finetune: {name}: per-round {json.dumps(detail)}", file=sys.stderr, flush=True)
    skipped = {c.name: c.skipped for c in train if c.skipped}
    if skipped:
        print(f"finetune: {name}: steps skipped by the spike guard: {skipped}", file=sys.stderr)
    rows = [c.row(name, pretrain.times) for c in train]
    return rows + (grpo.rows(name, pretrain.times) if grpo else [])


def finetune_rows(tmp: str, shapes: dict | None = None) -> list[dict]:
    """Rows of every shape (all of SHAPES by default), one tokenizer for all."""
    spm = tokenizer(tmp)
    rows = []
    for name, (shape, cases) in (shapes or SHAPES).items():
        rows += shape_rows(name, shape, spm, cases)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k, "") for k in keys} for row in rows]


def main() -> int:
    import argparse
    import tempfile

    from benchmarks.run import markdown_table

    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="", help=f"comma-separated subset of {list(SHAPES)}")
    args = parser.parse_args()
    wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if set(wanted) - set(SHAPES):
        unknown = sorted(set(wanted) - set(SHAPES))
        parser.error(f"--shapes: unknown {unknown}; known: {list(SHAPES)}")
    shapes = {k: SHAPES[k] for k in wanted} if wanted else None
    with tempfile.TemporaryDirectory() as tmp:
        rows = finetune_rows(tmp, shapes)
    for row in rows:
        print(json.dumps(row))
    print("\n".join(markdown_table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
