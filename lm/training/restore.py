"""Reading a finished (or running) run's parameters back, for sampling and evaluation."""

from __future__ import annotations

from lm import sharding, storage
from lm.models.transformer import ModelConfig
from lm.tokenizer.vocab import load_vocab
from lm.training.checkpoint import Checkpointer
from lm.training.setup import load_run_config
from lm.training.train_step import Trainer


def restore_params(workdir: str, step: int | None = None):
    """(graphdef, params, model_cfg, vocab, step) of a run's newest readable (or given) checkpoint.

    Restores onto the devices at hand (all on the data axis, across every process of a pod),
    whatever mesh trained it. Every process of a pod must call it.
    """
    cfg = load_run_config(workdir)
    cfg.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
    vocab = load_vocab(cfg.tokenizer.path, cfg.tokenizer.get("extra_ids", 0))
    model_cfg = ModelConfig.from_config(cfg.model, vocab.vocab_size)
    trainer = Trainer(cfg, model_cfg, sharding.make_mesh(cfg.mesh))
    ckpt = Checkpointer(
        storage.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints, async_save=False
    )
    try:
        if step is None:
            restored = ckpt.restore_latest(
                trainer.abstract_state, with_data=False, rename_corrupt=False
            )
            if restored is None:
                raise FileNotFoundError(f"no readable checkpoint in {ckpt.directory}")
            state, _, step = restored
        else:
            if step not in ckpt.steps():
                raise FileNotFoundError(
                    f"no checkpoint {step} in {ckpt.directory}; there are {ckpt.steps()}"
                )
            ckpt.check_shapes(step, trainer.abstract_state)
            state, _ = ckpt.restore(step, trainer.abstract_state, with_data=False)
    finally:
        ckpt.close()
    return trainer.graphdef, state.params, model_cfg, vocab, step
