"""Reading a finished (or running) run's parameters back, for sampling and evaluation.

A workdir written by `lm quantize` (config model.weight_bits > 0) holds a params-only
checkpoint of int8/int4 kernels and float32 scales; it restores the same way, into the
weight-quantized model (lm/quantize/weights.py).
"""

from __future__ import annotations

from lm import sharding, storage
from lm.models.transformer import ModelConfig
from lm.tokenizer.vocab import load_vocab
from lm.training.checkpoint import Checkpointer
from lm.training.setup import RestoredRun, load_run_config
from lm.training.train_step import Trainer


def needs_finetune_restore(cfg) -> bool:
    """A finetune run whose checkpoint is not a plain language model's: LoRA adapters (the
    base is another run) or a model with a head (reward model, PPO policy)."""
    ft = cfg.get("finetune")
    if ft is None or not ft.get("init"):
        return False
    return ft.lora.rank > 0 or ft.method in ("rm", "ppo")


def restore_run(workdir: str, step: int | None = None) -> RestoredRun:
    """The newest readable (or given) checkpoint of a run, with a Trainer to evaluate it.

    Restores onto the devices at hand (all on the data axis, across every process of a pod),
    whatever mesh trained it. Every process of a pod must call it.
    """
    cfg = load_run_config(workdir)
    if needs_finetune_restore(cfg):
        from lm.finetune.restore import restore_finetuned

        return restore_finetuned(workdir, step, restore_base=restore_run)
    cfg.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
    vocab = load_vocab(cfg.tokenizer.path, cfg.tokenizer.get("extra_ids", 0))
    model_cfg = ModelConfig.from_config(cfg.model, vocab.vocab_size)
    trainer = Trainer(cfg, model_cfg, sharding.make_mesh(cfg.mesh))
    # A quantized workdir's checkpoint is {"params": ...} (no optimizer state).
    quantized = model_cfg.weight_bits > 0
    abstract = {"params": trainer.abstract_state.params} if quantized else trainer.abstract_state
    ckpt = Checkpointer(
        storage.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints, async_save=False
    )
    try:
        if step is None:
            restored = ckpt.restore_latest(abstract, with_data=False, rename_corrupt=False)
            if restored is None:
                raise FileNotFoundError(f"no readable checkpoint in {ckpt.directory}")
            state, _, step = restored
        else:
            if step not in ckpt.steps():
                raise FileNotFoundError(
                    f"no checkpoint {step} in {ckpt.directory}; there are {ckpt.steps()}"
                )
            ckpt.check_shapes(step, abstract)
            state, _ = ckpt.restore(step, abstract, with_data=False)
    finally:
        ckpt.close()
    params = state["params"] if quantized else state.params
    return RestoredRun(cfg, trainer, params, model_cfg, vocab, step)


def restore_params(workdir: str, step: int | None = None):
    """(graphdef, params, model_cfg, vocab, step) of a run's newest readable (or given)
    checkpoint; see `restore_run`."""
    run = restore_run(workdir, step)
    return run.trainer.graphdef, run.params, run.model_cfg, run.vocab, run.step


def evaluate_workdir(workdir: str, num_batches: int | None = None) -> dict:
    """Validation loss / perplexity / bits per byte of a run's newest checkpoint over
    `num_batches` (default train.eval_batches) validation batches of its packed data (a
    quantized workdir reads its source run's packs: `lm quantize` records their cache dir)."""
    import jax

    from lm.data.packed import make_eval_batches, validation_bytes_per_token
    from lm.training.evaluate import evaluate

    run = restore_run(workdir)
    cfg = run.cfg
    n = num_batches or cfg.train.eval_batches
    batches = make_eval_batches(
        cfg, run.vocab, workdir, n, jax.process_index(), jax.process_count()
    )
    bpt = (
        validation_bytes_per_token(cfg, run.vocab, workdir) if cfg.data.objective == "lm" else None
    )
    return evaluate(run.trainer, run.params, batches, bpt)
