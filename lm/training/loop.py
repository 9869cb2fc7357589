"""`lm train`: tokenizer, data, sharded state, the step loop, evals, checkpoints, report.

Re-running in the same workdir resumes from the newest readable checkpoint, with the data
iterator restored, so the loss at every later step matches the uninterrupted run. SIGTERM and
SIGINT (TPU VM preemption, Ctrl-C) save a checkpoint at the end of the current call and exit.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from data_mixtures.objectives import validate_objective
from lm import sharding
from lm.data.curriculum import Curriculum
from lm.data.pipeline import (
    build_caches_apart,
    make_eval_batches,
    make_train_iterator,
    validation_bytes_per_token,
)
from lm.errors import ConfigError
from lm.models.transformer import ModelConfig
from lm.tokenizer.sentencepiece_tokenizer import load_vocabulary, train_tokenizer
from lm.training.checkpoint import Checkpointer
from lm.training.evaluate import evaluate
from lm.training.flops import model_flops_per_token
from lm.training.peaks import mfu, peak_flops_per_device
from lm.training.progress import ProgressLine
from lm.training.report import write_report
from lm.training.train_step import Trainer
from lm.training.writers import MetricsWriter


class Preempted(Exception):
    """Raised after the state was saved because SIGTERM/SIGINT arrived."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def init_distributed() -> None:
    """Joins the multi-host job when launched on all TPU VM workers (LM_MULTIHOST=1)."""
    if os.environ.get("LM_MULTIHOST") == "1" and jax.process_count() == 1:
        jax.distributed.initialize()


def tokenizer_path(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """The configured tokenizer, else `<workdir>/tokenizer/spm.model`, trained if missing."""
    if cfg.tokenizer.path:
        return cfg.tokenizer.path
    path = os.path.join(workdir, "tokenizer", "spm.model")
    if not os.path.exists(path):
        logging.info(
            "training a %s tokenizer (vocab %d)", cfg.tokenizer.kind, cfg.tokenizer.vocab_size
        )
        path = train_tokenizer(cfg.data, cfg.tokenizer, os.path.dirname(path))
    return path


def save_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was started with."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of an `lm train` run?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def steps_in_call(step: int, cfg: ml_collections.ConfigDict, curriculum: Curriculum) -> int:
    """How many steps the call that starts at `step` runs: `train.steps_per_call` when the group
    starts at a multiple of it, ends by `train.steps`, logs / evaluates / checkpoints only
    after its last step and keeps one row length (sequence-length warmup); otherwise 1.

    It depends on `step` alone, so a resumed run groups every step (and so compiles and rounds
    it) exactly as the uninterrupted run did.
    """
    t, k = cfg.train, cfg.train.steps_per_call
    if k <= 1 or step % k or step + k > t.steps:
        return 1
    last = step + k - 1
    if any(
        last // every != step // every for every in (t.log_every, t.eval_every, t.checkpoint_every)
    ):
        return 1
    return k if curriculum.row_len(step) == curriculum.row_len(last) else 1


def train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `cfg` in `workdir` (resuming if it holds checkpoints); returns a summary."""
    init_distributed()
    os.makedirs(workdir, exist_ok=True)
    primary = jax.process_index() == 0
    mesh = sharding.make_mesh(cfg.mesh)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.data.batch_size % (batch_shards * cfg.optim.grad_accum_steps):
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must divide by the data*fsdp mesh axes "
            f"({batch_shards} devices) times optim.grad_accum_steps; change "
            "--config.data.batch_size or --config.mesh.*"
        )
    for key in ("steps_per_call", "log_every", "eval_every", "checkpoint_every"):
        if cfg.train[key] < 1:
            raise ConfigError(f"train.{key}={cfg.train[key]} must be >= 1")
    if cfg.train.profile_steps < 0:
        raise ConfigError(f"train.profile_steps={cfg.train.profile_steps} must be >= 0")
    objective = cfg.data.objective
    validate_objective(objective)
    if (objective == "mlm") == cfg.model.causal:
        raise ConfigError(
            "data.objective=mlm needs model.causal=False (bidirectional), and the other "
            "objectives need model.causal=True"
        )
    vocab_path = tokenizer_path(cfg, workdir)
    cfg.tokenizer.path = os.path.abspath(vocab_path)
    vocab = load_vocabulary(vocab_path, cfg.tokenizer.extra_ids)
    model_cfg = ModelConfig.from_config(cfg.model, vocab.vocab_size)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}"
        )
    if cfg.data.batch_size % cfg.optim.grad_accum_steps:
        raise ConfigError("data.batch_size must be a multiple of optim.grad_accum_steps")
    curriculum = Curriculum.from_config(cfg)
    uneven = [
        f"train.{key}={cfg.train[key]}"
        for key in ("log_every", "eval_every", "checkpoint_every")
        if cfg.train[key] % cfg.train.steps_per_call
    ]
    if uneven:
        logging.warning(
            "train.steps_per_call=%d does not divide %s: the steps around those run one per "
            "call (slower)",
            cfg.train.steps_per_call,
            ", ".join(uneven),
        )
    if primary:
        save_config(cfg, workdir)
    build_caches_apart(cfg, vocab, workdir, jax.process_index(), jax.process_count())

    trainer = Trainer(cfg, model_cfg, mesh)
    logging.info("mesh %s; compiling the train step", dict(mesh.shape))
    # AOT-compile the program most steps will run: the grouped one if any group runs at all.
    per_call = cfg.train.steps_per_call
    grouped = per_call > 1 and any(
        steps_in_call(s, cfg, curriculum) > 1 for s in range(0, cfg.train.steps, per_call)
    )
    compiled = trainer.compile(per_call if grouped else 1)
    memory = compiled.memory_analysis()
    if memory is not None and primary:
        logging.info(
            "train step memory per device: %.1f MiB temp, %.1f MiB args",
            memory.temp_size_in_bytes / 2**20,
            memory.argument_size_in_bytes / 2**20,
        )

    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=cfg.train.keep_checkpoints,
        every=cfg.train.checkpoint_every,
        async_save=cfg.train.async_checkpoints,
    )
    data_iter = make_train_iterator(cfg, vocab, workdir, jax.process_index(), jax.process_count())
    restored = ckpt.restore_latest(trainer.abstract_state)
    if restored is not None:
        state, data_state, start = restored
        data_iter.set_state(data_state)
        logging.info("resumed from checkpoint %d in %s", start, ckpt.directory)
    else:
        state, start = trainer.init_state(), 0

    writer = MetricsWriter(workdir, is_primary=primary)
    progress = ProgressLine(total_steps=cfg.train.steps, is_primary=primary)
    writer.truncate_after(start + 1)  # keep what was logged up to the checkpoint
    eval_batches = make_eval_batches(
        cfg, vocab, workdir, cfg.train.eval_batches, jax.process_index(), jax.process_count()
    )
    # A mixture also reports each component's own validation loss ("loss/<name>").
    component_batches = {
        name: make_eval_batches(
            cfg,
            vocab,
            workdir,
            cfg.train.eval_batches,
            jax.process_index(),
            jax.process_count(),
            name,
        )
        for name in (data_iter.names if len(data_iter.names) > 1 else ())
    }
    bytes_per_token = validation_bytes_per_token(cfg, vocab, workdir) if objective == "lm" else None
    flops_per_token = model_flops_per_token(_resolved_model_cfg(cfg, model_cfg), cfg.data.seq_len)
    peak = peak_flops_per_device(jax.devices()[0])

    stop_signal: list[int] = []

    def on_signal(signum, _frame):
        stop_signal.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    throughput: list[float] = []
    summary: dict[str, Any] = {"resumed_from": start}
    t_last, step_last = time.perf_counter(), start
    profile_until, profiling = None, False  # profiler trace: steps (start, profile_until]
    done = start
    try:
        while done < cfg.train.steps:
            step = done
            if cfg.train.profile_steps and profile_until is None and step > start:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                profile_until, profiling = step + cfg.train.profile_steps, True
            count = steps_in_call(step, cfg, curriculum)
            if count == 1:
                state, step_metrics = trainer.train_step(
                    state, trainer.device_batch(next(data_iter))
                )
            else:
                group = [next(data_iter) for _ in range(count)]
                stacked = {k: np.stack([b[k] for b in group]) for k in group[0]}
                state, step_metrics = trainer.train_steps(state, trainer.device_batch(stacked))
            done = step + count
            if profiling and (done >= profile_until or done == cfg.train.steps):
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False
                logging.info("profiler trace up to step %d in %s/profile", done, workdir)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                # A group's metrics are [count]: log its last step, and how many it skipped.
                fetched = jax.device_get(step_metrics)
                values = {k: float(np.asarray(v).reshape(-1)[-1]) for k, v in fetched.items()}
                values["skipped"] = float(np.sum(fetched["skipped"]))
                now = time.perf_counter()
                dt = (now - t_last) / max(1, done - step_last)
                tokens_per_s = cfg.data.batch_size * cfg.data.seq_len / dt
                throughput.append(tokens_per_s)
                values.update(step_ms=dt * 1000, tokens_per_s=tokens_per_s)
                if len(data_iter.names) > 1:  # measured mixture proportions so far
                    taken = data_iter.rows_taken
                    values.update(
                        {f"mix/{n}": t / sum(taken) for n, t in zip(data_iter.names, taken)}
                    )
                util = mfu(tokens_per_s, flops_per_token, jax.device_count(), peak)
                if util is not None:
                    values["mfu"] = util
                if values["skipped"]:
                    logging.warning(
                        "step %d: %d update(s) skipped in the last %d step(s): loss spike or "
                        "not finite (loss %.4g, grad norm %.4g)",
                        done,
                        values["skipped"],
                        count,
                        values["loss"],
                        values["grad_norm"],
                    )
                writer.write(done, values)
                progress.show(done, values)
                t_last, step_last = time.perf_counter(), done
            if done % cfg.train.eval_every == 0 or done == cfg.train.steps:
                val = evaluate(trainer, state.params, eval_batches, bytes_per_token)
                for name, batches in component_batches.items():
                    val[f"loss/{name}"] = evaluate(trainer, state.params, batches, None)["loss"]
                writer.write(done, val, split="validation")
                summary["validation"] = val
                t_last = time.perf_counter()
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                ckpt.save(done, state, data_iter.get_state(), force=done == cfg.train.steps)
            if stop_signal:
                ckpt.save(done, state, data_iter.get_state(), force=True)
                ckpt.wait()
                logging.warning("signal %d: saved checkpoint %d; exiting", stop_signal[0], done)
                raise Preempted(stop_signal[0])
    finally:
        if profiling:
            jax.profiler.stop_trace()
        for s, handler in previous.items():
            signal.signal(s, handler)
        ckpt.close()
        writer.close()
        progress.close()

    summary.update(
        steps=cfg.train.steps,
        tokens_per_s_median=statistics.median(throughput) if throughput else math.nan,
        params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
    )
    if primary:
        samples = []
        if cfg.train.sample_prompts and objective == "lm":
            from lm.inference.sample import generate_text

            prompts = cfg.train.sample_prompts.split("|")
            texts = generate_text(
                trainer.graphdef,
                state.params,
                model_cfg,
                vocab,
                prompts,
                max_new_tokens=cfg.train.sample_tokens,
                temperature=0.8,
                top_k=40,
                seed=cfg.seed,
            )
            samples = list(zip(prompts, texts))
        summary["samples"] = samples
        summary["report"] = write_report(workdir, cfg, samples=samples)
    return summary


def _resolved_model_cfg(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig):
    """The model config group with the tokenizer's vocab size and resolved head counts."""
    resolved = ml_collections.ConfigDict(cfg.model.to_dict())
    resolved.vocab_size = model_cfg.vocab_size
    resolved.num_kv_heads = model_cfg.num_kv_heads
    resolved.head_dim = model_cfg.head_dim
    return resolved


def restore_params(workdir: str, step: int | None = None):
    """(graphdef, params, model_cfg, vocab, step) of a run's newest readable (or given) checkpoint.

    Restores onto the devices at hand (all on the data axis), whatever mesh trained it.
    """
    cfg = load_run_config(workdir)
    cfg.mesh.update(data=-1, fsdp=1, tensor=1)
    vocab = load_vocabulary(cfg.tokenizer.path, cfg.tokenizer.get("extra_ids", 0))
    model_cfg = ModelConfig.from_config(cfg.model, vocab.vocab_size)
    trainer = Trainer(cfg, model_cfg, sharding.make_mesh(cfg.mesh))
    ckpt = Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=cfg.train.keep_checkpoints,
        every=1,
        async_save=False,
    )
    try:
        if step is None:
            restored = ckpt.restore_latest(trainer.abstract_state)
            if restored is None:
                raise FileNotFoundError(f"no readable checkpoint in {ckpt.directory}")
            state, _, step = restored
        else:
            if step not in ckpt.steps():
                raise FileNotFoundError(
                    f"no checkpoint {step} in {ckpt.directory}; there are {ckpt.steps()}"
                )
            state, _ = ckpt.restore(step, trainer.abstract_state)
    finally:
        ckpt.close()
    return trainer.graphdef, state.params, model_cfg, vocab, step
