"""Run setup shared by `lm train` and the commands that read a run: config checks, the saved
run config, and how steps are grouped into calls."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from lm import jsonio, storage
from lm.config_checks import check_values
from lm.data.curriculum import Curriculum
from lm.data.objective_names import validate_objective
from lm.errors import CheckpointError, ConfigError
from lm.quantize.training import check_quant_training


@dataclasses.dataclass
class RestoredRun:
    """A run's config, a Trainer for its model on the devices at hand, and its params."""

    cfg: Any
    trainer: Any  # lm.training.train_step.Trainer
    params: Any
    model_cfg: Any  # lm.models.transformer.ModelConfig
    vocab: Any
    step: int


def validate(cfg: ml_collections.ConfigDict, mesh) -> None:
    """One-line ConfigErrors for settings that cannot train, before anything slow runs or
    anything is written to the workdir."""
    from lm.models.transformer import ModelConfig

    check_values(cfg)
    # The model group's choices, with a stand-in vocabulary size (the tokenizer may not exist
    # yet): a typo in model.position fails now, not after the data is packed.
    ModelConfig.from_config(cfg.model, cfg.model.vocab_size or cfg.tokenizer.vocab_size)
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}"
        )
    Curriculum.from_config(cfg)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    if cfg.data.batch_size % (batch_shards * cfg.optim.grad_accum_steps):
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} must divide by the data*fsdp*expert mesh axes "
            f"({batch_shards} devices) times optim.grad_accum_steps; change "
            "--config.data.batch_size or --config.mesh.*"
        )
    for key in ("steps_per_call", "log_every", "eval_every", "checkpoint_every"):
        if cfg.train[key] < 1:
            raise ConfigError(f"train.{key}={cfg.train[key]} must be >= 1")
    if cfg.train.profile_steps < 0:
        raise ConfigError(f"train.profile_steps={cfg.train.profile_steps} must be >= 0")
    check_quant_training(cfg)
    objective = cfg.data.objective
    validate_objective(objective)
    if (objective == "mlm") == cfg.model.causal:
        raise ConfigError(
            "data.objective=mlm needs model.causal=False (bidirectional), and the other "
            "objectives need model.causal=True"
        )


def refuse_quantized_workdir(workdir: str) -> None:
    """CheckpointError if `workdir` is an `lm quantize` output: training there would overwrite
    its config and cannot resume from int weights without optimizer state."""
    if not storage.exists(storage.join(workdir, "config.json")):
        return
    bits = load_run_config(workdir).model.get("weight_bits", 0)
    if bits:
        raise CheckpointError(
            f"{workdir} holds a weight-quantized (int{bits}) inference checkpoint from "
            "`lm quantize`; it cannot be trained or resumed: train in a new --workdir, or "
            "resume the original full-precision run"
        )


def save_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    storage.write_text(storage.join(workdir, "config.json"), cfg.to_json_best_effort(indent=2))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was started with."""
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} the workdir of an `lm train` run?")
    try:
        saved = jsonio.read_json(path)
    except jsonio.JSONError as e:
        raise ConfigError(str(e)) from None
    return ml_collections.ConfigDict(saved)


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


def check_checkpoints_fit(workdir: str, abstract_state: Any) -> None:
    """CheckpointError if the newest readable checkpoint in `workdir` holds another model than
    `abstract_state`; nothing if there is none.

    Why before anything is written: a mistyped override on a finished run
    (`--config.model.d_model=96`) used to overwrite its config.json before the restore found the
    mismatch, and every later `lm sample` / `lm eval` on the run failed. A checkpoint whose
    metadata cannot be read is left to the restore, which moves it aside and tries the next."""
    directory = storage.join(workdir, "checkpoints")
    if not storage.exists(directory):
        return
    from lm.training.checkpoint import Checkpointer

    ckpt = Checkpointer(directory, keep=1, async_save=False)
    try:
        for step in reversed(ckpt.steps()):
            try:
                ckpt.check_shapes(step, abstract_state)
            except CheckpointError:
                raise
            except Exception:  # noqa: BLE001 - unreadable: the restore deals with it
                continue
            return
    finally:
        ckpt.close()
