"""What `lm finetune` must show, on a `tiny` base pretrained on the stdlib's code only:

- SFT makes the model answer in the assistant format on held-out prompts (a `def name(...):`
  line that ends its turn), which the base model never does;
- DPO raises held-out preference accuracy well above the SFT model's;
- GRPO raises the verifiable reward by more than 3 standard errors, greedy on held-out prompts
  and sampled in its rollouts (first steps vs last steps);
- PPO raises the reward model's score while the KL to the reference stays under its target;
- replaying 25% code while adapting to prose forgets less code than adapting without replay.

Every run is a module fixture; the measurements are made here (generation through the serving
engine, rewards by lm.finetune.rewards) or read from the runs' finetune.json / metrics.jsonl.
Minutes of CPU: `make test-slow`.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from lm.cli import main
from tests.train_run import records

pytestmark = pytest.mark.slow

SEED = 0
N_HELD = 50  # held-out SFT prompts the format is measured on


def finetune(experiment: str, init: str, workdir: str, *overrides: str) -> str:
    argv = ["finetune", f"--experiment={experiment}", f"--init={init}", f"--workdir={workdir}"]
    assert main([*argv, *overrides]) == 0, experiment
    return workdir


def finetune_json(workdir: str) -> dict:
    with open(os.path.join(workdir, "finetune.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("quality")


@pytest.fixture(scope="module")
def base(root) -> str:
    """`tiny` pretrained on the stdlib's .py files only (no chat turns, no prose)."""
    workdir = str(root / "base")
    argv = ["train", "--experiment=tiny", f"--workdir={workdir}", "--config.data.include=*.py",
            "--config.train.sample_prompts="]  # fmt: skip
    assert main(argv) == 0
    return workdir


@pytest.fixture(scope="module")
def sft(base, root) -> str:
    return finetune("sft_tiny", base, str(root / "sft"))


@pytest.fixture(scope="module")
def rm(sft, root) -> str:
    return finetune("rm_tiny", sft, str(root / "rm"), "--config.train.steps=30")


# -- measuring replies -------------------------------------------------------------------------


def held_out_prompts(count: int) -> list[list[dict]]:
    """The first `count` conversations sft_tiny holds out (its data, size, fraction and seed),
    prompts only; checked to be absent from its training split."""
    from lm.config import get_config
    from lm.finetune import examples, make_data

    ft = get_config("sft_tiny").finetune
    items, _ = make_data.load_sft_data(ft.data, ft.max_examples, SEED)
    train, held = examples.split_holdout(items, ft.eval_fraction, SEED)
    seen = {conv[0]["content"] for conv in train}
    prompts = [conv[:-1] for conv in held[:count]]
    assert len(prompts) == count and not any(p[0]["content"] in seen for p in prompts)
    return prompts


def greedy_replies(workdir: str, prompts: list[list[dict]], max_tokens: int = 40) -> list:
    """(text, ended its turn) of each greedy reply through the serving engine, the prompt
    built by the chat template `lm serve` uses and generation stopped at its end token."""
    from lm.inference.engine import Engine
    from lm.inference.requests import SamplingParams
    from lm.tokenizer.chat import apply_chat_template, chat_stop_token_ids

    engine = Engine.from_workdir(workdir, slots=16)
    vocab = engine.vocab
    ids = [apply_chat_template(vocab, p, add_generation_prompt=True) for p in prompts]
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, stop_token_ids=chat_stop_token_ids(vocab)
    )
    return [(r.text, r.finish_reason == "stop") for r in engine.generate(ids, params)]


def format_rate(replies) -> float:
    """Fraction of replies that are one well-formed signature line and end their turn."""
    from lm.finetune.rewards import parse_signature

    return float(np.mean([ended and parse_signature(text) is not None for text, ended in replies]))


# -- SFT ---------------------------------------------------------------------------------------


def test_sft_answers_in_the_assistant_format_on_held_out_prompts(base, sft):
    prompts = held_out_prompts(N_HELD)
    base_replies, sft_replies = greedy_replies(base, prompts), greedy_replies(sft, prompts)
    base_rate, sft_rate = format_rate(base_replies), format_rate(sft_replies)
    print(f"format rate: base {base_rate:.2f}  sft {sft_rate:.2f}; e.g. {sft_replies[:3]}")
    assert sft_rate >= 0.7, sft_replies[:10]
    assert sft_rate - base_rate >= 0.6, (base_rate, sft_rate, base_replies[:5])
    record = finetune_json(sft)
    assert record["validation"]["loss"] < record["validation_before"]["loss"] - 1.0


# -- DPO ---------------------------------------------------------------------------------------


def test_dpo_raises_held_out_preference_accuracy(sft, root):
    dpo = finetune("dpo_tiny", sft, str(root / "dpo"), "--config.train.steps=60")
    record = finetune_json(dpo)
    before = record["validation_before"]["preference_accuracy"]
    after = record["validation"]["preference_accuracy"]
    n = record["data"]["held_out_examples"]
    print(f"held-out preference accuracy ({n} pairs): sft {before:.3f} -> dpo {after:.3f}")
    assert n >= 100
    assert after - before >= 0.5, (before, after)


# -- GRPO ----------------------------------------------------------------------------------------

GRPO_STEPS = 40
K = 10  # steps in each of the first / last windows of rollout rewards


def standard_errors(before: dict, after: dict, n: int) -> float:
    """The gain after - before of two means of `n` per-prompt rewards, in standard errors of
    their difference under "no change": the pooled standard deviation of all 2n rewards
    (as a permutation test would see them) times sqrt(2 / n)."""
    pooled = (before["reward_std"] ** 2 + after["reward_std"] ** 2) / 2
    pooled += ((after["reward"] - before["reward"]) / 2) ** 2
    return (after["reward"] - before["reward"]) / (math.sqrt(pooled * 2 / n) + 1e-12)


@pytest.fixture(scope="module")
def sft_brief(base, root) -> str:
    """SFT stopped early (24 steps): the greedy replies have the format about a third of the
    time. After the full sft_tiny they have it ~95% of the time and never the right name, so
    GRPO's greedy gain would be within noise (measured: 0.94 -> 0.98, 1.4 standard errors)."""
    return finetune("sft_tiny", base, str(root / "sft-brief"), "--config.train.steps=24")


def test_grpo_raises_the_verifiable_reward_beyond_its_noise(sft_brief, root):
    workdir = finetune(
        "grpo_tiny", sft_brief, str(root / "grpo"), f"--config.train.steps={GRPO_STEPS}",
        "--config.train.log_every=1", "--config.train.eval_every=1000",
    )  # fmt: skip
    record = finetune_json(workdir)
    before, after = record["validation_before"], record["validation"]
    n = min(64, record["data"]["held_out_prompts"])  # rollout.py scores up to 64 held out
    greedy = standard_errors(before, after, n)

    rows = records(workdir)
    rewards = np.array([rows[s]["rollout/reward_mean"] for s in sorted(rows)])
    assert len(rewards) == GRPO_STEPS
    first, last = rewards[:K], rewards[-K:]
    rollout_se = math.sqrt(first.var(ddof=1) / K + last.var(ddof=1) / K)
    rollout_gain = last.mean() - first.mean()
    print(
        f"greedy held-out reward {before['reward']:.3f} -> {after['reward']:.3f} "
        f"({greedy:.1f} standard errors, n {n}); rollout reward first {K} steps "
        f"{first.mean():.3f} -> last {K} {last.mean():.3f} ({rollout_gain / rollout_se:.1f} "
        f"standard errors); zero-std groups {[rows[s]['rollout/zero_std_groups'] for s in rows]}"
    )
    assert greedy > 3, (before, after)
    assert rollout_gain > 3 * rollout_se, (first, last)


# -- PPO ---------------------------------------------------------------------------------------


def test_ppo_raises_the_reward_model_score_within_the_kl_target(sft, rm, root):
    """The score must rise beyond its noise AND by a twentieth of the reward model's own held-out
    chosen-minus-rejected margin: the SFT model's replies all score alike (std ~0.01), so a
    shift too small to matter (+0.03 with the advantages' sign flipped) is already "7 standard
    errors"."""
    from lm.config import get_config

    rm_record = finetune_json(rm)
    assert rm_record["validation"]["accuracy"] >= 0.9, rm_record["validation"]
    margin = rm_record["validation"]["rewards/margin"]
    workdir = finetune(
        "ppo_tiny", sft, str(root / "ppo"), f"--config.finetune.rl.reward_model={rm}",
        "--config.train.steps=10", "--config.train.log_every=1", "--config.train.eval_every=1000",
    )  # fmt: skip
    record = finetune_json(workdir)
    before, after = record["validation_before"], record["validation"]
    n = min(64, record["data"]["held_out_prompts"])
    errors = standard_errors(before, after, n)
    rows = records(workdir)
    kl = [rows[s]["rollout/kl"] for s in sorted(rows)]
    target = get_config("ppo_tiny").finetune.rl.kl_target
    print(
        f"greedy held-out RM score {before['reward']:.3f} -> {after['reward']:.3f} ({errors:.1f} "
        f"standard errors, n {n}; RM held-out margin {margin:.2f}); rollout kl "
        f"{np.round(kl, 3).tolist()} (target {target})"
    )
    assert errors > 3, (before, after)
    assert after["reward"] - before["reward"] > 0.05 * margin, (before, after, margin)
    assert len(kl) == 10 and max(kl) < target, kl


# -- domain adaptation: replay -----------------------------------------------------------------

DOMAIN_STEPS = "--config.train.steps=100"


def test_replay_forgets_less_code_than_no_replay(base, root):
    replay = finetune("domain_tiny", base, str(root / "replay"), DOMAIN_STEPS)
    plain = finetune(
        "domain_tiny", base, str(root / "no-replay"), DOMAIN_STEPS,
        "--config.data.source=stdlib", "--config.data.include=*.rst,*.txt",
    )  # fmt: skip
    out = {}
    for name, workdir in (("replay", replay), ("no replay", plain)):
        record = finetune_json(workdir)
        prose = record["validation_before"].get("loss/prose", record["validation_before"]["loss"])
        prose_after = record["validation"].get("loss/prose", record["validation"]["loss"])
        code = record["before_tasks"]["lm_py_perplexity"]["bits_per_byte"]
        code_after = record["after_tasks"]["lm_py_perplexity"]["bits_per_byte"]
        out[name] = (prose, prose_after, code, code_after)
        print(
            f"{name}: prose loss {prose:.3f} -> {prose_after:.3f}; "
            f"code bits/byte {code:.4f} -> {code_after:.4f}"
        )
    for name, (prose, prose_after, _, _) in out.items():
        assert prose_after < prose - 0.2, (name, prose, prose_after)  # both learn the prose
    # The same held-out code, scored the same way, before either run.
    assert out["replay"][2] == pytest.approx(out["no replay"][2], rel=1e-6)
    rise_replay = out["replay"][3] - out["replay"][2]
    rise_plain = out["no replay"][3] - out["no replay"][2]
    assert rise_plain > 0.05, rise_plain  # adapting without replay forgets code
    assert rise_replay < 0.5 * rise_plain, (rise_replay, rise_plain)
