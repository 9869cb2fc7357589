"""Online RL (GRPO, PPO): each step's batch is sampled from the current policy.

Before every step, `RolloutSource.prepare` draws the step's prompts, sets the policy's current
weights on the generation engine (the same engine `lm serve` and `lm eval` use), samples
completions (G per prompt for GRPO, one for PPO), scores them (a Python reward function, or
the reward model for PPO), and computes what the objective reads: the rollout policy's and the
frozen reference's per-token log-probs (once per rollout, outside the train step), and the
advantages (GRPO: group-normalized; PPO: GAE over per-token rewards = reward-model score at
the end minus the adaptive KL penalty). The train step then runs on that batch through the one
train loop (`lm.training.loop.run_training`).

A GRPO group whose samples all score the same has zero advantage and teaches nothing but the
KL term; such groups are replaced by freshly drawn prompts (up to `rl.resample_rounds` rounds,
DAPO's dynamic sampling) so a step is not spent on a zero-gradient batch, and the fraction
left is logged as `rollout/zero_std_groups`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.finetune import examples, losses, make_data
from lm.finetune.heads import RewardModel
from lm.finetune.objectives import sequence_logps
from lm.finetune.policy import Policy
from lm.finetune.rewards import get_reward
from lm.inference.engine import Engine
from lm.inference.requests import SamplingParams
from lm.tokenizer.chat import chat_stop_token_ids
from lm.training.loop import run_training

ROW = ("inputs", "targets", "segment_ids", "positions", "weights")


def completion_rows(prompts: list[list[int]], completions: list[list[int]], seq_len: int) -> dict:
    """Prompt + completion next-token rows [n, seq_len], weights 1 where the target is a
    completion token. A too-long row loses prompt tokens from the left."""
    n = len(prompts)
    rows = {k: np.zeros((n, seq_len), np.float32 if k == "weights" else np.int32) for k in ROW}
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = (prompt + completion)[-(seq_len + 1) :]
        first = max(0, len(ids) - len(completion))  # index of the first completion token
        m = len(ids) - 1
        rows["inputs"][i, :m] = ids[:-1]
        rows["targets"][i, :m] = ids[1:]
        rows["segment_ids"][i, :m] = 1
        rows["positions"][i, :m] = np.arange(m)
        rows["weights"][i, max(first - 1, 0) : m] = 1.0
    return rows


class RolloutSource:
    """The batches of a GRPO / PPO run (the data iterator of `run_training`)."""

    def __init__(self, cfg, trainer, vocab, prompts: list, train_count: int, reward_model=None):
        """`prompts[:train_count]` are drawn for training, the rest are held out."""
        self.cfg, self.rl, self.trainer, self.vocab = cfg, cfg.finetune.rl, trainer, vocab
        self.method = cfg.finetune.method
        self.prompts, self.train_count = prompts, train_count
        self.prompt_ids = examples.encode_prompts(vocab, prompts)
        self.group = self.rl.group_size if self.method == "grpo" else 1
        self.batch = cfg.data.batch_size
        if self.batch != self.rl.prompts_per_step * self.group:
            from lm.errors import ConfigError

            raise ConfigError(
                f"data.batch_size={self.batch} must equal finetune.rl.prompts_per_step * "
                f"group_size={self.rl.prompts_per_step * self.group} for {self.method}"
            )
        self.reward = get_reward(self.rl.reward) if reward_model is None else None
        self.reward_model = reward_model  # (graphdef, params) of an `rm` run
        self.policy = Policy(trainer, trainer.model_cfg)
        graphdef = self.policy.lm_graphdef

        def reference_logps(params, rows):
            return sequence_logps(nnx.merge(graphdef, params), rows)[0]

        self._reference_logps = jax.jit(reference_logps)
        if reward_model is not None:
            rm_graphdef = reward_model[0]
            self._rm_scores = jax.jit(lambda params, rows: nnx.merge(rm_graphdef, params)(rows))
        self.stop_ids = chat_stop_token_ids(vocab)
        self.kl = (
            losses.AdaptiveKLController(self.rl.kl_coef, self.rl.kl_target, self.rl.kl_horizon)
            if self.method == "ppo"
            else None
        )
        self.engine: Engine | None = None
        self.ref_params = None
        self.step, self.names = 0, ("rollouts",)
        self._batch: dict | None = None

    # -- data-iterator protocol ------------------------------------------------------------

    @property
    def rows_taken(self) -> list[int]:
        return [self.step * self.batch]

    def get_state(self) -> dict:
        return {"step": self.step, "kl_coef": self.kl.value if self.kl else 0.0}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
        if self.kl is not None:
            self.kl.value = float(state["kl_coef"])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch, self._batch = self._batch, None
        per_host = self.batch // jax.process_count()
        lo = jax.process_index() * per_host
        return {k: v[lo : lo + per_host] for k, v in batch.items()}

    # -- rollouts --------------------------------------------------------------------------

    def start(self, params) -> None:
        """The engine on the initial policy, and the frozen reference = the initial policy."""
        lm = self.policy.lm_params(params)
        self.ref_params = jax.tree.map(jnp.copy, lm)
        slots = self.batch
        self.engine = Engine(
            self.policy.lm_graphdef, lm, self.trainer.model_cfg, self.vocab, slots=slots,
            max_queue=4 * slots + 64, decode_steps=8,
            prefill_budget=slots * self.trainer.model_cfg.max_seq_len,
        )  # fmt: skip

    def sample(self, params, prompt_index: list[int], seed: int, greedy: bool = False) -> tuple:
        """(prompt ids, completion ids, completion texts) of each prompt index, the current
        policy sampling (or greedy)."""
        self.engine.set_params(self.policy.lm_params(params))
        prompts = [self.prompt_ids[i] for i in prompt_index]
        sampling = [
            SamplingParams(
                max_tokens=self.rl.max_new_tokens,
                temperature=0.0 if greedy else self.rl.temperature,
                top_p=self.rl.top_p,
                seed=seed * 100_003 + j,
                stop_token_ids=self.stop_ids,
            )
            for j in range(len(prompts))
        ]
        results = self.engine.generate(prompts, sampling)
        completions = [
            r.token_ids
            + ([self.stop_ids[0]] if r.finish_reason == "stop" and self.stop_ids else [])
            for r in results
        ]
        return prompts, completions, [r.text for r in results]

    def score(self, prompt_index: list[int], texts: list[str], rows: dict) -> np.ndarray:
        """Rewards [n]: the reward model's scores, or the Python reward function's."""
        if self.reward_model is not None:
            return np.asarray(self._rm_scores(self.reward_model[1], rows))
        out = []
        for i, text in zip(prompt_index, texts):
            item = self.prompts[i]
            out.append(self.reward(item.prompt[-1]["content"], text, item.answer))
        return np.asarray(out, np.float32)

    def _draw(self, rng: np.random.Generator, count: int) -> list[int]:
        return [int(x) for x in rng.integers(0, self.train_count, count)]

    def prepare(self, state, step: int) -> dict:
        """Samples and scores the batch of `step`; returns the rollout's metrics."""
        if self.engine is None:
            self.start(state.params)
        rng = np.random.default_rng((self.cfg.seed, step))
        g, n = self.group, self.rl.prompts_per_step
        index = [i for i in self._draw(rng, n) for _ in range(g)]
        prompts, completions, texts = self.sample(state.params, index, seed=step)
        rows = completion_rows(prompts, completions, self.cfg.data.seq_len)
        rewards = self.score(index, texts, rows)
        metrics: dict[str, float] = {"rollout/reward_mean": float(rewards.mean())}
        if self.method == "grpo":
            index, prompts, completions, texts, rewards, zero = self._resample(
                state, rng, step, index, prompts, completions, texts, rewards
            )
            rows = completion_rows(prompts, completions, self.cfg.data.seq_len)
            metrics["rollout/zero_std_groups"] = zero
        old_logps, old_values = self.policy.outputs(state.params, rows)
        ref_logps = np.asarray(self._reference_logps(self.ref_params, rows))
        mask = rows["weights"]
        seq_kl = float(np.mean(np.sum((old_logps - ref_logps) * mask, axis=1)))
        metrics.update(
            {
                "rollout/kl": seq_kl,
                "rollout/completion_tokens": float(mask.sum(axis=1).mean()),
                "rollout/reward_std": float(rewards.std()),
            }
        )
        batch = {**rows, "old_logps": old_logps}
        if self.method == "grpo":
            batch["ref_logps"] = ref_logps
            batch["advantages"] = np.asarray(losses.group_advantages(jnp.asarray(rewards), g))
        else:
            kl = losses.kl_penalty(jnp.asarray(old_logps), jnp.asarray(ref_logps), "k1", mask)
            token_rewards = losses.per_token_rewards(jnp.asarray(rewards), kl, mask, self.kl.value)
            adv, returns = losses.gae(
                token_rewards, jnp.asarray(old_values), mask, self.rl.gamma, self.rl.lam
            )
            batch["advantages"] = np.asarray(losses.whiten(adv, jnp.asarray(mask)))
            batch["returns"], batch["old_values"] = np.asarray(returns), old_values
            metrics["rollout/kl_coef"] = self.kl.value
            self.kl.update(seq_kl, self.batch)  # Ziegler et al.: n = episodes this update
        self._batch = {k: np.asarray(v) for k, v in batch.items()}
        self.step = step + 1
        return metrics

    def _resample(self, state, rng, step, index, prompts, completions, texts, rewards):
        """GRPO groups with all-equal rewards replaced by fresh prompts' groups (a few rounds);
        returns the batch and the fraction of zero-variance groups left in it."""
        g = self.group
        for round_ in range(self.rl.resample_rounds):
            grouped = rewards.reshape(-1, g)
            flat = np.flatnonzero(grouped.max(1) == grouped.min(1))
            if not len(flat):
                break
            new_index = [i for i in self._draw(rng, len(flat)) for _ in range(g)]
            p, c, t = self.sample(state.params, new_index, seed=step + 1_000_003 * (round_ + 1))
            r = self.score(new_index, t, completion_rows(p, c, self.cfg.data.seq_len))
            r_grouped = r.reshape(-1, g)
            for slot, (gi, new_group) in enumerate(zip(flat, r_grouped)):
                if new_group.max() == new_group.min():
                    continue
                span = range(gi * g, (gi + 1) * g)
                for j, k in zip(span, range(slot * g, (slot + 1) * g)):
                    index[j], prompts[j], completions[j], texts[j] = (
                        new_index[k],
                        p[k],
                        c[k],
                        t[k],
                    )
                    rewards[j] = r[k]
        grouped = rewards.reshape(-1, g)
        zero = float(np.mean(grouped.max(1) == grouped.min(1)))
        return index, prompts, completions, texts, rewards, zero

    def evaluate(self, params, items: list[int]) -> dict:
        """Greedy completions of held-out prompts: their mean reward (or reward-model score)
        and the fraction well-formed, the measure GRPO / PPO should raise."""
        prompts, completions, texts = self.sample(params, items, seed=0, greedy=True)
        rows = completion_rows(prompts, completions, self.cfg.data.seq_len)
        rewards = self.score(items, texts, rows)
        return {"reward": float(rewards.mean()), "reward_std": float(rewards.std())}


def load_reward_model(workdir: str):
    """(graphdef, params) of an `lm finetune` reward-model run (`finetune.method=rm`)."""
    from lm.finetune.restore import restore_finetuned
    from lm.training.restore import restore_run

    run = restore_finetuned(workdir, restore_base=restore_run, as_language_model=False)
    if not isinstance(nnx.merge(run.trainer.graphdef, run.params), RewardModel):
        from lm.errors import ConfigError

        raise ConfigError(f"finetune.rl.reward_model={workdir} is not a reward-model run (rm)")
    return run.trainer.graphdef, run.params


def rollout_training(
    cfg, workdir: str, trainer, trainable, vocab, stop, samples=None
) -> tuple[Any, dict]:
    """GRPO / PPO in the one train loop, with rollouts before every step; `samples`
    (lm/finetune/report.py) takes the init's replies to held-out prompts before training."""
    ft = cfg.finetune
    items, rejects = make_data.load_prompt_data(
        ft.data or "stdlib:verifiable", ft.max_examples, cfg.seed
    )
    if ft.eval_data:
        held, _ = make_data.load_prompt_data(ft.eval_data, 0, cfg.seed)
    else:
        items, held = examples.split_holdout(items, ft.eval_fraction, cfg.seed)
    # A prompt that leaves no room for `max_new_tokens` in the context is a counted reject.
    room = trainer.model_cfg.max_seq_len - ft.rl.max_new_tokens

    def fitting(prompts: list) -> list:
        lengths = map(len, examples.encode_prompts(vocab, prompts))
        return [p for p, n in zip(prompts, lengths) if n <= room]

    too_long = len(items) + len(held)
    items, held = fitting(items), fitting(held)
    too_long -= len(items) + len(held)
    if too_long:
        rejects["too_long"] += too_long
    if not items or not held:
        from lm.errors import DataError

        raise DataError(
            f"no training or held-out prompt fits the context ({room} tokens of prompt with "
            f"finetune.rl.max_new_tokens={ft.rl.max_new_tokens}); shorten the prompts"
        )
    reward_model = None
    if cfg.finetune.method == "ppo":
        if not ft.rl.reward_model:
            from lm.errors import ConfigError

            raise ConfigError("PPO needs --config.finetune.rl.reward_model=<an rm run's workdir>")
        reward_model = load_reward_model(ft.rl.reward_model)
    source = RolloutSource(cfg, trainer, vocab, items + held, len(items), reward_model)
    held_index = list(range(len(items), len(items) + len(held)))[: ft.eval_prompts]
    source.start(trainable)

    def validation(params):
        return source.evaluate(params, held_index)

    before = validation(trainable)
    if samples is not None:
        samples.before(trainable, held)
    state, summary = run_training(
        cfg, workdir, trainer, source, validation, stop,
        initial_state=lambda: trainer.state_from_params(trainable),
        before_batch=source.prepare,
    )  # fmt: skip
    summary.update(
        validation_before=before,
        data={
            "train_prompts": len(items),
            "held_out_prompts": len(held),
            "rejected": dict(rejects),
        },
    )
    source.engine = None
    return state, summary
