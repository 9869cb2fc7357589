"""Reward functions for RL fine-tuning (GRPO, PPO without a reward model), by name.

A reward is `(prompt_text, completion, answer) -> float`: the prompt as text, the generated
completion as text (cut at the end-of-turn token), and the item's expected answer (None when the
data has none). `--config.finetune.rl.reward=NAME` picks one from `REWARDS`, or any function as
`package.module:function`.

Why two levels for `signature`: a reward that only pays for the exact answer is almost never
reached by a tiny model, so its samples would all score 0 and GRPO's group advantages would
vanish. The well-formed part (a `def name(...):` line Python accepts) is within reach after SFT
on stdlib:instructions, so the reward varies inside a group and training can raise it.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable

from lm.errors import ConfigError

Reward = Callable[[str, str, str | None], float]


def parse_signature(completion: str) -> str | None:
    """The function name when `completion` is one well-formed `def name(...):` line (a trailing
    comment allowed) that Python parses with a `pass` body; else None."""
    line = completion.strip()
    if "\n" in line or not line.startswith("def "):
        return None
    try:
        tree = ast.parse(line + "\n    pass\n")
    except (SyntaxError, ValueError):
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    func = tree.body[0]
    if func.decorator_list or len(func.body) != 1 or not isinstance(func.body[0], ast.Pass):
        return None
    return func.name


def format_reward(prompt_text: str, completion: str, answer: str | None) -> float:
    """1.0 for a well-formed signature line, else 0.0."""
    return float(parse_signature(completion) is not None)


def signature_reward(prompt_text: str, completion: str, answer: str | None) -> float:
    """1.0 for a well-formed signature line, plus 1.0 when its name is the answer (0.0 to 2.0)."""
    name = parse_signature(completion)
    if name is None:
        return 0.0
    return 1.0 + float(answer is not None and name == answer.strip())


REWARDS: dict[str, Reward] = {"signature": signature_reward, "format": format_reward}


def get_reward(name: str) -> Reward:
    """The reward registered as `name`, or the function `package.module:function`."""
    if name in REWARDS:
        return REWARDS[name]
    known = ", ".join(sorted(REWARDS))
    if ":" not in name:
        raise ConfigError(
            f"unknown finetune.rl.reward {name!r}: use one of {known} or package.module:function"
        )
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"finetune.rl.reward {name!r} cannot be loaded ({type(e).__name__}: {e}); "
            f"known names: {known}"
        ) from None
    if not callable(fn):
        raise ConfigError(f"finetune.rl.reward {name!r} is not a function")
    return fn
