"""The fine-tuning recipe for imported checkpoints and the warning for a pretraining learning
rate (lm/finetune/recipe.py), on configs alone (no training: tests/test_finetune.py trains an
`hf:` init and reads the logged rates).

Expected rates are the published anchors the recipe is built on (2e-5 at d_model 4096, about
5e-5 at GPT-2's 768, 1e-5 at 70B's 8192 and above) and hand-computed values."""

from __future__ import annotations

import json
import logging

import pytest

from lm.config import default_config, get_config
from lm.finetune import recipe

LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "intermediate_size": 11008,
    "vocab_size": 32000,
}


@pytest.mark.parametrize(
    "width, method, lora, expected",
    [
        (4096, "sft", False, 2e-5),  # Llama-2-7B chat SFT
        (768, "sft", False, 4.62e-5),  # GPT-2: about 5e-5
        (8192, "sft", False, 1.41e-5),  # 70B: about 1e-5
        (32768, "sft", False, 1e-5),  # the floor
        (64, "sft", False, 1e-4),  # a tiny test model: the ceiling, not 1e-3
        (4096, "sft", True, 2e-4),  # LoRA at 7B
        (4096, "dpo", False, 2e-6),  # TRL's DPO range
        (4096, "grpo", True, 2e-5),
    ],
)
def test_recipe_rates_follow_the_published_anchors(width, method, lora, expected):
    assert recipe.imported_lr(width, method, lora) == pytest.approx(expected, rel=1e-2)


def test_recipe_warmup_is_short_and_weight_decay_off():
    assert recipe.imported_recipe(64, 150, "sft", False) == {
        "lr": 1e-4, "warmup_steps": 4, "weight_decay": 0.0, "schedule": "cosine",
    }  # fmt: skip
    assert recipe.imported_recipe(64, 2, "sft", False)["warmup_steps"] == 1


def _hf_dir(tmp_path, config: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_hf_init_gets_the_recipe_unless_the_command_line_sets_optim(tmp_path, caplog):
    hf = _hf_dir(tmp_path, LLAMA_7B)
    overrides = ["--config.train.steps=100"]
    cfg = get_config("sft_tiny", [*overrides, f"--config.finetune.init=hf:{hf}"])
    with caplog.at_level(logging.INFO):
        assert recipe.apply_imported_recipe(cfg, overrides) is not None
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay) == (2e-5, 3, 0.0)
    assert "fine-tuning recipe lr 2e-05" in caplog.text

    for spelling in ("--config.optim.lr=5e-3", "config.optim.b2=0.99", "optim.warmup_steps=3"):
        cfg = get_config("sft_tiny", [f"--config.finetune.init=hf:{hf}"])
        assert recipe.apply_imported_recipe(cfg, [spelling]) is None
        assert cfg.optim.lr == get_config("sft_tiny").optim.lr  # the experiment's, untouched


def test_native_inits_keep_the_experiments_rate(tmp_path):
    """A run pretrained here keeps its experiment's optim (sft_tiny's 1e-3 on a tiny run)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(get_config("tiny").to_json())
    cfg = get_config("sft_tiny", [f"--config.finetune.init={workdir}"])
    assert recipe.apply_imported_recipe(cfg, []) is None and cfg.optim.lr == 1e-3
    converted = default_config()
    converted.hf = {"architecture": "LlamaForCausalLM"}  # what `lm convert` records
    (workdir / "config.json").write_text(converted.to_json())
    assert recipe.apply_imported_recipe(cfg, []) is not None  # a workdir lm convert made


def _cfg(init: str, lr: float, lora: int = 0):
    cfg = get_config("sft_tiny", [f"--config.finetune.init={init}", f"--config.optim.lr={lr}"])
    cfg.finetune.lora.rank = lora
    return cfg


def test_pretraining_rates_warn_fine_tuning_rates_do_not():
    tiny = get_config("tiny")  # pretrained at 3e-3
    converted = default_config()
    converted.hf = {"architecture": "LlamaForCausalLM"}
    warn = recipe.pretraining_lr_warning
    # The case: 2.7e-3 on an imported Llama.
    message = warn(_cfg("hf:/m", 2.7e-3), converted)
    assert "optim.lr=0.0027 is a pretraining learning rate" in message
    assert "imported checkpoint" in message and "\n" not in message
    assert warn(_cfg("/runs/converted", 1e-3), converted) is not None
    assert warn(_cfg("/runs/tiny", 3e-3), tiny) is not None  # the init's own pretraining rate
    assert warn(_cfg("/runs/tiny", 1e-3), tiny) is None  # sft_tiny on a tiny run
    assert warn(_cfg("/runs/tiny", 5e-3, lora=8), tiny) is None  # lora_tiny: adapters from 0
    assert warn(_cfg("/runs/tiny", 3e-2, lora=8), tiny) is not None
    assert warn(_cfg("hf:/m", 1e-4), converted) is None
