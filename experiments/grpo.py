"""GRPO with DeepSeekMath's hyper-parameters (Shao et al. 2024): G=64 samples per prompt, lr 1e-6,
KL beta 0.04, clip 0.2, 1024 completion tokens; for real checkpoints and a reward function."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip().splitlines()[0]
    c.finetune.update(method="grpo", data="", eval_fraction=0.01)
    c.finetune.rl.update(
        prompts_per_step=16, group_size=64, max_new_tokens=1024, temperature=1.0, top_p=1.0,
        clip_eps=0.2, kl_beta=0.04,
    )  # fmt: skip
    c.data.update(seq_len=1536, batch_size=1024)
    c.optim.update(
        lr=1e-6, warmup_steps=0, schedule="constant", weight_decay=0.0, spike_factor=0.0,
        grad_accum_steps=16,
    )  # fmt: skip
    c.train.update(steps=1000, log_every=1, eval_every=50, checkpoint_every=50)
    return c
