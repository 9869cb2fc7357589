"""Reading an `lm finetune` run back: its own checkpoint, plus the base it was made from when it
holds only LoRA adapters, merged into a plain language model for sampling, `lm eval` and
`lm serve`.

`lm.training.restore.restore_run` sends a workdir here when its config says it needs more
than the plain language model (`needs_finetune_restore`): adapters (only they are in its
checkpoint; the base is `finetune.init`), or a model with a head (reward model, PPO policy).
"""

from __future__ import annotations

from collections.abc import Callable

from lm import sharding, storage
from lm.finetune.objectives import make_objective
from lm.finetune.policy import Policy, initial_params
from lm.models.transformer import ModelConfig
from lm.tokenizer.vocab import load_vocab
from lm.training.checkpoint import Checkpointer
from lm.training.setup import RestoredRun, load_run_config
from lm.training.train_step import Trainer


def restore_finetuned(
    workdir: str,
    step: int | None = None,
    *,
    restore_base: Callable[[str], RestoredRun],
    as_language_model: bool = True,
    base_workdir: str | None = None,
) -> RestoredRun:
    """A finetune run's params. `as_language_model`: a plain Transformer (adapters merged into
    the base; a PPO policy's value head and a reward model's score head left out), else the
    objective's own model. `base_workdir` overrides the base a LoRA run's config names;
    `restore_base` reads it (`lm.training.restore.restore_run`, passed in so this module does
    not import it back)."""
    cfg = load_run_config(workdir)
    cfg.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
    vocab = load_vocab(cfg.tokenizer.path, cfg.tokenizer.get("extra_ids", 0))
    model_cfg = ModelConfig.from_config(cfg.model, vocab.vocab_size)
    trainer = Trainer(cfg, model_cfg, sharding.make_mesh(cfg.mesh), make_objective(cfg))
    if trainer.abstract_frozen is not None:  # LoRA: the frozen base comes from the init run
        base = restore_base(base_workdir or _base_of(cfg, workdir))
        _, frozen = initial_params(trainer, base.params)
        trainer.set_frozen(frozen)
    ckpt = Checkpointer(storage.join(workdir, "checkpoints"), keep=100, async_save=False)
    try:
        if step is None:
            restored = ckpt.restore_latest(
                trainer.abstract_state, with_data=False, rename_corrupt=False
            )
            if restored is None:
                raise FileNotFoundError(f"no readable checkpoint in {ckpt.directory}")
            state, _, step = restored
        else:
            ckpt.check_shapes(step, trainer.abstract_state)
            state, _ = ckpt.restore(step, trainer.abstract_state, with_data=False)
    finally:
        ckpt.close()
    if not as_language_model:
        return RestoredRun(cfg, trainer, state.params, model_cfg, vocab, step)
    policy = Policy(trainer, model_cfg)
    plain = Trainer(_plain_config(cfg), model_cfg, trainer.mesh)
    return RestoredRun(cfg, plain, policy.lm_params(state.params), model_cfg, vocab, step)


def _base_of(cfg, workdir: str) -> str:
    init = cfg.finetune.init
    return storage.join(workdir, "base") if init.startswith("hf:") else init


def _plain_config(cfg):
    plain = cfg.copy_and_resolve_references()
    plain.finetune.lora.rank = 0
    plain.finetune.method = "sft"
    return plain
