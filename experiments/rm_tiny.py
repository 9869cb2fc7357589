"""A reward model (Bradley-Terry) on stdlib preference pairs, from an SFT run (--init=W)."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    c.finetune.update(method="rm", data="stdlib:preferences", max_examples=2000)
    c.data.update(seq_len=128, batch_size=16)
    c.optim.update(lr=5e-4, warmup_steps=10, weight_decay=0.0, spike_factor=0.0)
    c.train.update(steps=100, log_every=10, eval_every=50, checkpoint_every=50, steps_per_call=10)
    return c
