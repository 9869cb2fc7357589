"""GRPO on stdlib docstring -> signature prompts from an SFT run (--init=W): 8 prompts x G=4
samples a step, the `signature` verifiable reward; a CPU run in minutes."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip().splitlines()[0]
    c.finetune.update(method="grpo", data="stdlib:verifiable", max_examples=2000)
    c.finetune.rl.update(
        prompts_per_step=8, group_size=4, max_new_tokens=24, temperature=1.0, clip_eps=0.2,
        kl_beta=0.04, reward="signature",
    )  # fmt: skip
    c.data.update(seq_len=96, batch_size=32)
    c.optim.update(lr=3e-4, warmup_steps=5, schedule="constant", weight_decay=0.0, spike_factor=0.0)
    c.train.update(steps=40, log_every=5, eval_every=20, checkpoint_every=20, steps_per_call=1)
    return c
