"""Learning rates for fine-tuning: the recipe for imported checkpoints, and a warning when a
fine-tune runs at a pretraining learning rate.

Why: an experiment's `optim` group is tuned for the tiny models this project pretrains itself
(`sft_tiny` runs at 1e-3 on a `tiny` run pretrained at 3e-3). A checkpoint imported from
Hugging Face was pretrained elsewhere, to convergence, and is fine-tuned at rates two orders of
magnitude lower: 2e-5 for Llama-2-7B (d_model 4096) chat SFT, 5e-5 for GPT-2, 1e-5 at 70B, with
a short warmup and no weight decay. Starting it at 1e-3 wipes out much of what it knew within
a few steps, silently.

The recipe scales the full fine-tuning rate as 1/sqrt(width) through those anchors (2e-5 at
d_model 4096 gives 4.6e-5 at GPT-2's 768 and 1.4e-5 at 8192), clipped to [1e-5, 1e-4] so a
tiny test model (d_model 64) gets 1e-4, not a pretraining rate. LoRA adapters start at zero and
take a 10x larger rate (the usual 2e-4 at 7B); preference and RL objectives (DPO, GRPO, PPO)
a 10x smaller one (TRL's 1e-6..5e-6 at 7B). `lm finetune` applies it to `hf:` inits (and to
workdirs imported by `lm convert`) unless the command line sets any `optim.*` key itself.
"""

from __future__ import annotations

import logging
import math

import ml_collections

from lm import storage

REFERENCE_WIDTH = 4096  # Llama-2-7B's d_model
REFERENCE_LR = 2e-5  # its full fine-tuning rate (Llama 2 chat SFT, Alpaca)
LR_RANGE = (1e-5, 1e-4)  # full fine-tuning, any width
LORA_FACTOR = 10.0
METHOD_FACTOR = {"dpo": 0.1, "grpo": 0.1, "ppo": 0.1}
WARMUP_FRACTION = 0.03  # of the steps (HF's warmup_ratio), at least one step
PRETRAINING_LR = 1e-3  # at or above this (LoRA: 10x), a rate looks like pretraining


def imported_lr(d_model: int, method: str, lora: bool) -> float:
    """The recipe's peak learning rate for a model of width `d_model`."""
    low, high = LR_RANGE
    lr = min(high, max(low, REFERENCE_LR * math.sqrt(REFERENCE_WIDTH / max(1, d_model))))
    lr *= METHOD_FACTOR.get(method, 1.0) * (LORA_FACTOR if lora else 1.0)
    return float(f"{lr:.3g}")


def imported_recipe(d_model: int, steps: int, method: str, lora: bool) -> dict:
    """The `optim` keys the recipe sets: rate, a short warmup, no weight decay, cosine decay."""
    return {
        "lr": imported_lr(d_model, method, lora),
        "warmup_steps": max(1, round(WARMUP_FRACTION * steps)),
        "weight_decay": 0.0,
        "schedule": "cosine",
    }


def sets_optim(overrides: list[str]) -> bool:
    """Whether any command-line override sets an `optim.*` key (in any spelling
    `lm.config.apply_overrides` accepts)."""
    for raw in overrides:
        item = raw[2:] if raw.startswith("--") else raw
        item = item[len("config.") :] if item.startswith("config.") else item
        if item.startswith("optim.") or item.startswith("optim="):
            return True
    return False


def _run_config(workdir: str) -> ml_collections.ConfigDict | None:
    from lm.training.setup import load_run_config

    if not storage.exists(storage.join(workdir, "config.json")):
        return None
    try:
        return load_run_config(workdir)
    except Exception:  # unreadable: `lm finetune` reports it when it restores the init
        return None


def is_imported(init: str, init_cfg: ml_collections.ConfigDict | None) -> bool:
    """An `hf:` init, a workdir `lm convert` made (its config has an `hf` group), or a fine-tune
    of either."""
    if init.startswith("hf:"):
        return True
    if init_cfg is None:
        return False
    parent = init_cfg.get("finetune", {}).get("init", "") or ""
    return "hf" in init_cfg or parent.startswith("hf:")


def _width(init: str, init_cfg: ml_collections.ConfigDict | None) -> int | None:
    """d_model of the init: from the HF config of an `hf:` dir, else from its run config."""
    if init_cfg is not None:
        return int(init_cfg.model.d_model)
    try:
        from lm.convert import hf as hf_io
        from lm.convert.families import family_for_config

        hf_cfg = hf_io.read_config(init[len("hf:") :])
        return int(family_for_config(hf_cfg).model_keys(hf_cfg)["d_model"])
    except Exception:  # a broken directory: the import reports it in one line
        return None


def apply_imported_recipe(cfg: ml_collections.ConfigDict, overrides: list[str]) -> dict | None:
    """Sets the recipe's `optim` keys when `finetune.init` is imported and `overrides` set no
    `optim.*` key; returns what it set (None: left as the experiment has it)."""
    init = cfg.finetune.init or ""
    if not init or sets_optim(overrides):
        return None
    init_cfg = None if init.startswith("hf:") else _run_config(init)
    if not is_imported(init, init_cfg):
        return None
    width = _width(init, init_cfg)
    if width is None:
        return None
    method, lora = cfg.finetune.method, cfg.finetune.lora.rank > 0
    recipe = imported_recipe(width, cfg.train.steps, method, lora)
    cfg.optim.update(recipe)
    logging.info(
        "imported checkpoint (d_model %d): fine-tuning recipe lr %.3g, warmup %d step(s), no "
        "weight decay (set --config.optim.* to choose your own)",
        width, recipe["lr"], recipe["warmup_steps"],
    )  # fmt: skip
    return recipe


def uses_imported_recipe(
    cfg: ml_collections.ConfigDict, init_cfg: ml_collections.ConfigDict | None
) -> bool:
    """Whether the run's `optim` keys are the recipe's for this imported init (for the report:
    the rate came from the recipe, not from the experiment)."""
    init = cfg.finetune.init or ""
    if init_cfg is None or not is_imported(init, init_cfg):
        return False
    ft = cfg.finetune
    recipe = imported_recipe(
        int(init_cfg.model.d_model), cfg.train.steps, ft.method, ft.lora.rank > 0
    )
    return all(cfg.optim[k] == v for k, v in recipe.items())


def pretraining_lr_warning(
    cfg: ml_collections.ConfigDict, init_cfg: ml_collections.ConfigDict | None
) -> str | None:
    """A warning when `optim.lr` looks like a pretraining rate for this init: at or above 1e-3
    (LoRA: 1e-2) and either the init is imported or the rate is at least the init's own
    pretraining rate. None when the rate is a fine-tuning one."""
    lr = float(cfg.optim.lr)
    lora = cfg.finetune.lora.rank > 0
    scale = LORA_FACTOR if lora else 1.0
    if lr < PRETRAINING_LR * scale:
        return None
    init = cfg.finetune.init or ""
    own = None if init_cfg is None else float(init_cfg.optim.lr)
    imported = is_imported(init, init_cfg)
    if not imported and (own is None or lr < own):
        return None
    why = "the init is an imported checkpoint" if imported else f"the init was trained at {own:.3g}"
    usual = "1e-4..1e-3 for LoRA" if lora else "1e-5..1e-4"
    return (
        f"optim.lr={lr:.3g} is a pretraining learning rate and {why}: fine-tuning at it can "
        f"erase what the model learned (fine-tuning rates are about {usual}; without "
        "--config.optim.* an hf: init gets the fine-tuning recipe, lm/finetune/recipe.py)"
    )
