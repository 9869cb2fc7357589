"""PPO (InstructGPT-style RLHF) from an SFT run (--init=W) against an `rm_tiny` reward model
(--config.finetune.rl.reward_model=W): value head, GAE, clipped losses, adaptive KL."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip().splitlines()[0]
    c.finetune.update(method="ppo", data="stdlib:verifiable", max_examples=2000)
    c.finetune.rl.update(
        prompts_per_step=16, group_size=1, max_new_tokens=24, temperature=1.0, clip_eps=0.2,
        kl_coef=0.3, kl_target=6.0, kl_horizon=160, gamma=1.0, lam=0.95, value_clip=0.2,
        value_coef=0.1,
    )  # fmt: skip
    c.data.update(seq_len=96, batch_size=16)
    c.optim.update(lr=2e-4, warmup_steps=5, schedule="constant", weight_decay=0.0, spike_factor=0.0)
    c.train.update(steps=40, log_every=5, eval_every=20, checkpoint_every=20, steps_per_call=1)
    return c
