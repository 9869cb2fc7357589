"""`lm train`: tokenizer, data, sharded state, the step loop, evals, checkpoints, report.

Re-running in the same workdir resumes from the newest readable checkpoint, with every host's
data iterator restored, so the loss at every later step matches the uninterrupted run. SIGTERM
and SIGINT (TPU VM preemption, Ctrl-C) on any host make every host save one checkpoint at the
end of the current call and exit with 128 + the signal.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from lm import distributed, sharding, stages, storage
from lm.data.curriculum import Curriculum
from lm.data.packed import (
    ensure_packed,
    make_eval_batches,
    make_train_iterator,
    tokenizer_file,
    validation_bytes_per_token,
)
from lm.models.transformer import ModelConfig
from lm.stages import stage
from lm.tokenizer.vocab import load_vocab
from lm.training import lock as workdir_lock
from lm.training.checkpoint import Checkpointer
from lm.training.evaluate import evaluate
from lm.training.finish import finish_run
from lm.training.flops import model_flops_per_token
from lm.training.guards import Preempted, SkipGuard, StopRequests
from lm.training.peaks import mfu, peak_flops_per_device
from lm.training.progress import ProgressLine
from lm.training.restore import restore_params
from lm.training.setup import (
    check_checkpoints_fit,
    load_run_config,
    refuse_quantized_workdir,
    save_config,
    steps_in_call,
    validate,
)
from lm.training.train_step import Trainer
from lm.training.writers import MetricsWriter

__all__ = ["Preempted", "load_run_config", "restore_params", "steps_in_call", "train"]


def init_distributed() -> None:
    """Joins the multi-process job the environment describes (see lm/distributed.py)."""
    distributed.initialize()


def tokenizer_path(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """The configured tokenizer, else `<workdir>/tokenizer/spm.model` (`lm data pack` trains
    it, in its own process, so the trainer never reads raw documents)."""
    return tokenizer_file(cfg, workdir)


def train(
    cfg: ml_collections.ConfigDict, workdir: str, initial_params: Any = None
) -> dict[str, Any]:
    """Trains `cfg` in `workdir` (resuming if it holds checkpoints); returns a summary.
    `initial_params` (continued pretraining from a checkpoint) replace the fresh init; the
    summary then also holds their validation as "validation_before". Holds the workdir's
    lock throughout (a second run on it stops at once; lm/training/lock.py)."""
    init_distributed()
    with StopRequests() as stop, workdir_lock.hold(workdir):
        return _train(cfg, workdir, stop, initial_params)


def _train(
    cfg: ml_collections.ConfigDict, workdir: str, stop: StopRequests, initial_params: Any = None
) -> dict[str, Any]:
    clock = _run_clock()
    primary = jax.process_index() == 0
    # Everything that can be checked is checked before anything is written to the workdir, so a
    # mistyped override on a finished run fails with one line and leaves the run as it was.
    with stage("checking the config and the devices"):
        mesh = sharding.make_mesh(cfg.mesh)
        validate(cfg, mesh)
        refuse_quantized_workdir(workdir)
    vocab_path = tokenizer_path(cfg, workdir)
    built = None
    if storage.exists(vocab_path):  # a run being resumed, or a configured tokenizer
        built = _build_trainer(cfg, vocab_path, mesh)
        _check_checkpoints(workdir, built[0])
    storage.makedirs(workdir)
    # One host packs the data (and trains the tokenizer) apart while the others wait; then a
    # host that does not share its workdir with host 0 (a local disk) packs its own copy.
    if primary:
        ensure_packed(cfg, workdir)
    distributed.barrier("lm-data")
    if not primary:
        ensure_packed(cfg, workdir)
    if built is None:  # the tokenizer was trained just now (or checkpoints lost theirs)
        built = _build_trainer(cfg, vocab_path, mesh)
        _check_checkpoints(workdir, built[0])
    trainer, model_cfg, vocab = built
    cfg.tokenizer.path = storage.absolute(vocab_path)
    curriculum = Curriculum.from_config(cfg)
    _warn_uneven_calls(cfg)
    if primary:
        save_config(cfg, workdir)

    logging.info("mesh %s; compiling the train step", dict(mesh.shape))
    # AOT-compile the program most steps will run: the grouped one if any group runs at all.
    per_call = cfg.train.steps_per_call
    grouped = per_call > 1 and any(
        steps_in_call(s, cfg, curriculum) > 1 for s in range(0, cfg.train.steps, per_call)
    )
    with stage("compiling the train step"):
        compiled = trainer.compile(per_call if grouped else 1)
    memory = compiled.memory_analysis()
    if memory is not None and primary:
        logging.info(
            "train step memory per device: %.1f MiB temp, %.1f MiB args",
            memory.temp_size_in_bytes / 2**20,
            memory.argument_size_in_bytes / 2**20,
        )

    with stage("opening the training data"):
        data_iter = make_train_iterator(
            cfg, vocab, workdir, jax.process_index(), jax.process_count()
        )
    with stage("reading the validation batches"):
        validation = pretraining_validation(cfg, workdir, trainer, vocab, data_iter.names)
    initial_state = before = None
    if initial_params is not None:
        with stage("validating the initial parameters"):
            before = validation(initial_params)

        def initial_state():
            return trainer.state_from_params(initial_params)

    started = time.perf_counter()
    state, summary = run_training(
        cfg, workdir, trainer, data_iter, validation, stop, curriculum, initial_state
    )
    stages.record(
        "restoring, saving and closing checkpoints",
        time.perf_counter() - started - summary.get("loop_seconds", 0.0),
    )
    if before is not None:
        summary["validation_before"] = before
    summary.update(finish_run(cfg, workdir, trainer, state.params, model_cfg, vocab, clock))
    if stop.agreed():  # a signal during the final evaluation or sampling
        raise Preempted(stop.signum)
    return summary


def _run_clock() -> tuple[int, float]:
    """(index of this run's first phase in `stages.timings()`, when the run started).

    The first run of a process (`lm train`) counts from the process start, with the imports and
    device set-up before it as a phase of their own; a later one (a test, the speedrun) from
    now, so its report lists its own phases only."""
    first = len(stages.timings())
    if first == 0:
        before = stages.since_start()
        stages.record("starting up (imports, config, devices)", before)
        return 0, time.time() - before
    return first, time.time()


def _build_trainer(cfg: ml_collections.ConfigDict, vocab_path: str, mesh) -> tuple:
    """(Trainer, ModelConfig, vocabulary) for the configured model and tokenizer."""
    with stage("building the model"):
        vocab = load_vocab(vocab_path, cfg.tokenizer.extra_ids)
        model_cfg = ModelConfig.from_config(cfg.model, vocab.vocab_size)
        return Trainer(cfg, model_cfg, mesh), model_cfg, vocab


def _check_checkpoints(workdir: str, trainer: Trainer) -> None:
    with stage("checking the checkpoints against the model"):
        check_checkpoints_fit(workdir, trainer.abstract_state)


def _warn_uneven_calls(cfg: ml_collections.ConfigDict) -> None:
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


def pretraining_validation(cfg, workdir, trainer, vocab, names) -> Callable[[Any], dict]:
    """params -> validation loss / perplexity / bits per byte over the packed validation split,
    plus each mixture component's own loss ("loss/<name>")."""
    index, count_ = jax.process_index(), jax.process_count()
    eval_batches = make_eval_batches(cfg, vocab, workdir, cfg.train.eval_batches, index, count_)
    component_batches = {
        name: make_eval_batches(cfg, vocab, workdir, cfg.train.eval_batches, index, count_, name)
        for name in (names if len(names) > 1 else ())
    }
    objective = cfg.data.objective
    bytes_per_token = validation_bytes_per_token(cfg, vocab, workdir) if objective == "lm" else None

    def validation(params) -> dict:
        val = evaluate(trainer, params, eval_batches, bytes_per_token)
        for name, batches in component_batches.items():
            val[f"loss/{name}"] = evaluate(trainer, params, batches, None)["loss"]
        return val

    return validation


def run_training(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    trainer: Trainer,
    data_iter: Any,
    validation: Callable[[Any], dict],
    stop: StopRequests,
    curriculum: Curriculum | None = None,
    initial_state: Callable[[], Any] | None = None,
    before_batch: Callable[[Any, int], dict | None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The one train loop of every objective: resume from the newest checkpoint (or start from
    `initial_state()`, default a fresh init), run the steps, log, validate, checkpoint.

    `data_iter` yields host-local batches and has `get_state` / `set_state` (saved in
    checkpoints) and `names` / `rows_taken` (mixture components). `before_batch(state, step)`
    runs before each batch is drawn: an online objective (PPO, GRPO) generates it from the
    current params there."""
    curriculum = curriculum or Curriculum.from_config(cfg)
    ckpt = Checkpointer(
        storage.join(workdir, "checkpoints"),
        keep=cfg.train.keep_checkpoints,
        async_save=cfg.train.async_checkpoints,
    )
    try:
        restored = ckpt.restore_latest(trainer.abstract_state)
        if restored is not None:
            state, data_state, start = restored
            data_iter.set_state(data_state)
            logging.info("resumed from checkpoint %d in %s", start, ckpt.directory)
        else:
            state = initial_state() if initial_state is not None else trainer.init_state()
            start = 0
        writer = MetricsWriter(workdir, is_primary=jax.process_index() == 0)
        writer.truncate_after(start + 1)  # keep what was logged up to the checkpoint
        try:
            return _loop(
                cfg, workdir, trainer, curriculum, state, start, data_iter, ckpt, writer, stop,
                validation, before_batch,
            )  # fmt: skip
        finally:
            writer.close()
    finally:
        ckpt.close()


def _loop(cfg, workdir, trainer, curriculum, state, start, data_iter, ckpt, writer, stop,
          validate, before_batch):  # fmt: skip
    """Steps from `start` to `train.steps`; returns (state, summary)."""
    primary = jax.process_index() == 0
    progress = ProgressLine(total_steps=cfg.train.steps, is_primary=primary)
    model_cfg = trainer.model_cfg
    flops_per_token = model_flops_per_token(_resolved_model_cfg(cfg, model_cfg), cfg.data.seq_len)
    peak = peak_flops_per_device(jax.devices()[0])
    guard = SkipGuard(cfg.optim.get("max_consecutive_skips", 20))

    def validation():
        """Validates the current params; the result also gets a line of its own on the
        console (the progress line only shows train metrics)."""
        result = validate(state.params)
        progress.note(_validation_line(done, result))
        return result

    loop_start = time.perf_counter()
    throughput: list[float] = []
    summary: dict[str, Any] = {"resumed_from": start}
    t_last, step_last = time.perf_counter(), start
    profile_until, profiling = None, False  # profiler trace: steps (start, profile_until]
    done = start
    pending = None  # the previous call's `skipped`, read after the next call is dispatched
    batch_metrics: dict = {}  # what `before_batch` reported about the last batch (rollouts)
    try:
        while done < cfg.train.steps:
            step = done
            if cfg.train.profile_steps and profile_until is None and step > start:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                profile_until, profiling = step + cfg.train.profile_steps, True
            count = steps_in_call(step, cfg, curriculum)
            if before_batch is not None:
                batch_metrics = before_batch(state, step) or {}
            if count == 1:
                state, step_metrics = trainer.train_step(
                    state, trainer.device_batch(next(data_iter))
                )
            else:
                group = [next(data_iter) for _ in range(count)]
                stacked = {k: np.stack([b[k] for b in group]) for k in group[0]}
                state, step_metrics = trainer.train_steps(state, trainer.device_batch(stacked))
            if pending is not None:
                guard.update(jax.device_get(pending), step)
            pending = step_metrics["skipped"]
            done = step + count
            if profiling and (done >= profile_until or done == cfg.train.steps):
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False
                logging.info("profiler trace up to step %d in %s/profile", done, workdir)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                # A group's metrics are [count]: log its last step, and how many it skipped.
                fetched = jax.device_get(step_metrics)
                values = {k: _last_step(v, count) for k, v in fetched.items()}
                values["skipped"] = float(np.sum(fetched["skipped"]))
                values.update(batch_metrics)
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
                summary["validation"] = validation()
                writer.write(done, summary["validation"], split="validation")
                t_last = time.perf_counter()
            stopping = stop.agreed()  # every host, every call: all stop at the same step
            if stopping or done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                ckpt.save(done, state, data_iter.get_state())
            if stopping:
                ckpt.wait()
                logging.warning("signal %d: saved checkpoint %d; exiting", stop.signum, done)
                raise Preempted(stop.signum)
        if pending is not None:
            guard.update(jax.device_get(pending), done)
    finally:
        if profiling:
            jax.profiler.stop_trace()
        progress.close()
    steps_name = f"training steps {start}-{done}" if done > start else "training steps (none left)"
    stages.record(steps_name, time.perf_counter() - loop_start)
    if "validation" not in summary:  # resumed from the final checkpoint
        with stage("validating the final checkpoint"):
            summary["validation"] = validation()
    summary["loop_seconds"] = time.perf_counter() - loop_start  # the phases timed here
    summary.update(
        steps=cfg.train.steps,
        tokens_per_s_median=statistics.median(throughput) if throughput else math.nan,
        params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)),
    )
    return state, summary


def _validation_line(step: int, val: dict) -> str:
    """`validation step 200: loss 4.1234 perplexity 61.80 bits/byte 1.523`; an objective
    without a loss (a reward model's accuracy) shows its first few numbers instead."""
    shown = {"loss": ".4f", "perplexity": ".2f", "bits_per_byte": ".3f"}
    keys = [k for k in shown if isinstance(val.get(k), float | int)]
    if not keys:
        keys = [k for k, v in val.items() if isinstance(v, float) and "/" not in k][:4]
    parts = [
        f"{k.replace('bits_per_byte', 'bits/byte')} {val[k]:{shown.get(k, '.4g')}}" for k in keys
    ]
    return f"validation step {step}: " + " ".join(parts)


def _last_step(value: Any, count: int) -> float | list[float]:
    """The last step's value of a metric: a float, or a list for a vector metric (e.g.
    moe/expert_load [E]); a group of `count` > 1 steps stacks every metric on a leading axis."""
    a = np.asarray(value)
    if count > 1:
        a = a[-1]
    return float(a) if a.ndim == 0 else [float(x) for x in a.reshape(-1)]


def _resolved_model_cfg(cfg: ml_collections.ConfigDict, model_cfg: ModelConfig):
    """The model config group with the tokenizer's vocab size and resolved head counts."""
    resolved = ml_collections.ConfigDict(cfg.model.to_dict())
    resolved.vocab_size = model_cfg.vocab_size
    resolved.num_kv_heads = model_cfg.num_kv_heads
    resolved.head_dim = model_cfg.head_dim
    return resolved
