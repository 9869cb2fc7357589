"""`lm finetune`: a checkpoint (a workdir, or hf:DIR) trained further with one objective.

The objective is the pluggable part of the one trainer (lm/training/train_step.py) and the
steps run in the one train loop (`lm.training.loop.run_training`: resume, logging,
validation, checkpoints, preemption). What differs per method is where batches come from:
- sft: chat conversations packed into rows whose weights mark assistant tokens only;
- lm: continued pretraining (domain adaptation) through `lm train`'s data pipeline, with an
  optional replay mixture of the original data (`data.source=mixture`);
- rm / dpo: preference pairs (DPO adds the reference log-probs, computed once here);
- grpo / ppo: rollouts of the current policy through the generation engine (rollout.py).

The finetuned workdir holds config.json (the model and tokenizer of the init run, the
`finetune` group naming it), its checkpoints (with LoRA: the adapters and their optimizer
state only, plus adapter.json), finetune.json (validation before and after, data counts with
every rejected record's reason, sample replies) and report.md (lm/finetune/report.py).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Any

import jax
import ml_collections
import numpy as np

from lm import distributed, sharding, storage
from lm.errors import ConfigError
from lm.finetune import examples, make_data
from lm.finetune.objectives import make_objective, sequence_logps
from lm.finetune.policy import initial_params
from lm.finetune.recipe import pretraining_lr_warning, uses_imported_recipe
from lm.finetune.report import SampleReplies, summary_lines, write_report
from lm.training import lock as workdir_lock
from lm.training.guards import Preempted, StopRequests
from lm.training.loop import run_training
from lm.training.restore import RestoredRun, restore_run
from lm.training.setup import refuse_quantized_workdir, save_config, validate
from lm.training.train_step import Trainer

MARKER = "finetune.json"


def resolve_init(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """The workdir to start from: `finetune.init`, or for hf:DIR the run `lm convert` makes of
    it in `<workdir>/base` (once)."""
    init = cfg.finetune.init
    if not init:
        raise ConfigError("set --init=WORKDIR (or hf:DIR): the checkpoint to fine-tune")
    if not init.startswith("hf:"):
        if not storage.exists(storage.join(init, "config.json")):
            raise ConfigError(f"--init={init}: no run there (no config.json)")
        return init
    base = storage.join(workdir, "base")
    if not storage.exists(storage.join(base, "config.json")):
        from lm.convert.workdir import import_hf

        import_hf(init[len("hf:") :], base)
    return base


def adopt_base(cfg: ml_collections.ConfigDict, base: RestoredRun) -> None:
    """The fine-tuning config takes the init run's model and tokenizer (they come with the
    checkpoint); `--config.model.dropout` stays overridable."""
    dropout = cfg.model.dropout
    cfg.model = ml_collections.ConfigDict(base.cfg.model.to_dict())
    cfg.model.dropout = dropout
    if base.model_cfg.weight_bits and cfg.finetune.lora.rank <= 0:
        raise ConfigError(
            f"--init={cfg.finetune.init} holds int{base.model_cfg.weight_bits} weights (`lm "
            "quantize`): fine-tune it with LoRA (QLoRA: --config.finetune.lora.rank=8), or "
            "start from the full-precision run"
        )
    cfg.tokenizer = ml_collections.ConfigDict(base.cfg.tokenizer.to_dict())
    if cfg.data.seq_len > base.model_cfg.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds the init model's max_seq_len="
            f"{base.model_cfg.max_seq_len}"
        )


class ArraySource:
    """Batches of `batch_size` examples from host-local arrays [n, ...], reshuffled each epoch;
    which examples a step reads is a function of (seed, step) only, so a resumed run reads the
    same batches. Host h of P takes rows [h*B/P, (h+1)*B/P) of each global batch."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int):
        self.arrays, self.batch_size, self.seed = arrays, batch_size, seed
        self.n = len(next(iter(arrays.values())))
        self.step = 0
        self.names = ("finetune",)
        self.index, self.count = jax.process_index(), jax.process_count()

    @property
    def rows_taken(self) -> list[int]:
        return [self.step * self.batch_size]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = self.batch_size
        positions = np.arange(self.step * b, (self.step + 1) * b)
        epochs, slots = positions // self.n, positions % self.n
        rows = np.array(
            [np.random.default_rng((self.seed, int(e))).permutation(self.n)[s]
             for e, s in zip(epochs, slots)]
        )  # fmt: skip
        per_host = b // self.count
        rows = rows[self.index * per_host : (self.index + 1) * per_host]
        self.step += 1
        return {k: v[rows] for k, v in self.arrays.items()}

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict]:
    """Held-out examples in fixed batches, this host's share of each; the last batch is padded
    with zero-weight copies of the first rows (they add nothing to the sums)."""
    n = len(next(iter(arrays.values())))
    count, index = jax.process_count(), jax.process_index()
    out = []
    for start in range(0, n, batch_size):
        take = np.arange(start, start + batch_size) % n
        batch = {k: v[take].copy() for k, v in arrays.items()}
        pad = take < start  # wrapped around: padding
        for k in batch:
            if k.endswith("weights"):
                batch[k][pad] = 0.0
        per_host = batch_size // count
        out.append({k: v[index * per_host : (index + 1) * per_host] for k, v in batch.items()})
    return out


def validate_objective(trainer: Trainer, params, batches: list[dict]) -> dict:
    """Loss and the objective's metrics (divided by the total weight) over fixed batches."""
    sums: dict[str, float] = {}
    for batch in batches:
        out = jax.device_get(trainer.eval_step(params, trainer.device_batch(batch)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    weight = max(sums.pop("weight_sum", 0.0), 1.0)
    result = {"loss": sums.pop("loss_sum", 0.0) / weight, "weight": weight}
    result.update({k[: -len("_sum")]: v / weight for k, v in sums.items()})
    return result


def reference_logps(trainer: Trainer, params, arrays: dict[str, np.ndarray]) -> dict:
    """The DPO reference's sequence log-probs of every pair, computed once (the reference is
    the init model: the policy before any update)."""
    from lm.finetune.objectives import ROW

    @jax.jit
    def logps(params, frozen, rows):
        model = trainer.merge(params, frozen)
        return sequence_logps(model, rows)[1]

    out = {}
    for side in ("chosen", "rejected"):
        values = []
        n = len(arrays[f"{side}_inputs"])
        for start in range(0, n, trainer.cfg.data.batch_size):
            rows = {
                k: arrays[f"{side}_{k}"][start : start + trainer.cfg.data.batch_size] for k in ROW
            }
            values.append(np.asarray(logps(params, trainer.frozen, rows)))
        out[f"ref_{side}_logps"] = np.concatenate(values).astype(np.float32)
    return out


def finetune(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Fine-tunes `finetune.init` with `finetune.method` into `workdir`; returns a summary.
    Holds the workdir's lock throughout (a second run on it stops at once)."""
    distributed.initialize()
    with StopRequests() as stop, workdir_lock.hold(workdir):
        summary = _finetune(cfg, workdir, stop)
    return summary


def _finetune(cfg: ml_collections.ConfigDict, workdir: str, stop: StopRequests) -> dict:
    storage.makedirs(workdir)
    refuse_quantized_workdir(workdir)
    method = cfg.finetune.method
    init = resolve_init(cfg, workdir)
    base = restore_run(init)
    adopt_base(cfg, base)
    lr_warning = pretraining_lr_warning(cfg, base.cfg)
    if lr_warning:
        logging.warning(lr_warning)
    recipe = uses_imported_recipe(cfg, base.cfg)
    if method == "lm":  # continued pretraining: `lm train`'s data pipeline and loop
        from lm.finetune.domain import adapt

        return adapt(cfg, workdir, base, stop)
    mesh = sharding.make_mesh(cfg.mesh)
    validate(cfg, mesh)
    if jax.process_index() == 0:
        save_config(cfg, workdir)
    trainer = Trainer(cfg, base.model_cfg, mesh, make_objective(cfg))
    trainable, frozen = initial_params(trainer, base.params)
    if frozen is not None:
        trainer.set_frozen(frozen)
    samples = SampleReplies(cfg, trainer, base.model_cfg, load_vocab_of(cfg))
    del base  # its params are now the trainer's
    vocab = samples.vocab
    if method in ("grpo", "ppo"):
        from lm.finetune.rollout import rollout_training

        state, summary = rollout_training(cfg, workdir, trainer, trainable, vocab, stop, samples)
    else:
        state, summary = _offline_training(cfg, workdir, trainer, trainable, samples, stop)
    summary.update(lr_warning=lr_warning, recipe=recipe)
    return _finished(cfg, workdir, trainer, state, samples, summary, stop)


def _offline_training(cfg, workdir: str, trainer, trainable, samples, stop) -> tuple[Any, dict]:
    """SFT, reward model or DPO on a fixed set of examples, held-out ones validated."""
    items, held_items, rejects = offline_items(cfg)
    train_arrays, held_arrays, counts = encode_offline(
        cfg, samples.vocab, items, held_items, rejects
    )
    if cfg.finetune.method == "dpo":
        train_arrays.update(reference_logps(trainer, trainable, train_arrays))
        held_arrays.update(reference_logps(trainer, trainable, held_arrays))
    source = ArraySource(train_arrays, cfg.data.batch_size, cfg.seed)
    held = eval_batches(held_arrays, cfg.data.batch_size)

    def validation(params):
        return validate_objective(trainer, params, held)

    before = validation(trainable)
    samples.before(trainable, held_items)
    state, summary = run_training(
        cfg, workdir, trainer, source, validation, stop,
        initial_state=lambda: trainer.state_from_params(trainable),
    )  # fmt: skip
    summary.update(validation_before=before, data=counts)
    return state, summary


def _finished(cfg, workdir, trainer, state, samples, summary: dict, stop) -> dict:
    samples.after(state.params)
    summary.update(finish(cfg, workdir, trainer, samples, summary))
    if stop.agreed():  # a signal during the final evaluation
        raise Preempted(stop.signum)
    return summary


def load_vocab_of(cfg: ml_collections.ConfigDict):
    from lm.tokenizer.vocab import load_vocab

    return load_vocab(cfg.tokenizer.path, cfg.tokenizer.get("extra_ids", 0))


def offline_items(cfg: ml_collections.ConfigDict) -> tuple[list, list, Counter]:
    """(train items, held-out items, reject counts) of an sft / rm / dpo run."""
    ft = cfg.finetune
    if not ft.data:
        raise ConfigError("set --config.finetune.data (a JSONL file or stdlib:...)")
    sft = ft.method == "sft"
    load = make_data.load_sft_data if sft else make_data.load_preference_data
    items, rejects = load(ft.data, ft.max_examples, cfg.seed)
    if ft.eval_data:
        held, held_rejects = load(ft.eval_data, 0, cfg.seed)
        rejects = rejects + held_rejects
    else:
        items, held = examples.split_holdout(items, ft.eval_fraction, cfg.seed)
    if not held:
        raise ConfigError("no held-out examples: set finetune.eval_fraction > 0 or eval_data")
    return items, held, rejects


def encode_offline(
    cfg, vocab, items: list, held: list, rejects: Counter
) -> tuple[dict, dict, dict]:
    """(train arrays, held-out arrays, data counts) of the items: packed conversations (sft)
    or preference rows (rm / dpo)."""
    if cfg.finetune.method == "sft":
        train_arrays, cut = examples.pack_conversations(vocab, items, cfg.data.seq_len)
        held_arrays, held_cut = examples.pack_conversations(vocab, held, cfg.data.seq_len)
    else:
        train_arrays, cut = examples.encode_pairs(vocab, items, cfg.data.seq_len)
        held_arrays, held_cut = examples.encode_pairs(vocab, held, cfg.data.seq_len)
    counts = {
        "train_examples": len(items),
        "held_out_examples": len(held),
        "rejected": dict(rejects),
        "cut": dict(cut + held_cut),
    }
    logging.info("finetune data: %s", counts)
    return train_arrays, held_arrays, counts


def offline_data(cfg: ml_collections.ConfigDict, vocab) -> tuple[dict, dict, dict]:
    """(train arrays, held-out arrays, data counts) of an sft / rm / dpo run."""
    return encode_offline(cfg, vocab, *offline_items(cfg))


def finish(cfg, workdir: str, trainer: Trainer, samples, summary: dict) -> dict:
    """finetune.json (validation before / after, data counts with rejects, sample replies),
    adapter.json for LoRA, and report.md; the lines `lm finetune` prints."""
    out: dict[str, Any] = {}
    record = {
        "method": cfg.finetune.method,
        "init": cfg.finetune.init,
        "steps": cfg.train.steps,
        "optim": {k: cfg.optim[k] for k in ("lr", "schedule", "warmup_steps", "weight_decay")},
        "recipe": bool(summary.get("recipe")),
        "lr_warning": summary.get("lr_warning"),
        "validation_before": summary.get("validation_before"),
        "validation": summary.get("validation"),
        "data": summary.get("data"),
        "trainable_params": summary.get("params"),
        "samples": samples.records(),
    }
    if jax.process_index() == 0:
        if cfg.finetune.lora.rank > 0:
            from lm.finetune.lora import adapter_metadata

            meta = adapter_metadata(cfg.finetune.lora, trainer.objective.paths)
            storage.write_text(storage.join(workdir, "adapter.json"), json.dumps(meta, indent=2))
            record["adapter"] = meta
        storage.write_text(storage.join(workdir, MARKER), json.dumps(record, indent=2))
        out["record"] = storage.join(workdir, MARKER)
    out["report"] = write_report(workdir, cfg, record)
    out["lines"] = summary_lines(record, out["report"])
    return out
