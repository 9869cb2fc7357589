"""DPO on stdlib preference pairs from an SFT run (--init=W): beta 0.1, plus the chosen answers'
NLL (RPO) so the tiny policy keeps generating well-formed answers; a CPU run in a minute."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip().splitlines()[0]
    c.finetune.update(method="dpo", data="stdlib:preferences", max_examples=2000)
    c.finetune.dpo.update(beta=0.1, nll_weight=1.0)
    c.data.update(seq_len=128, batch_size=16)
    c.optim.update(lr=5e-4, warmup_steps=10, weight_decay=0.0, spike_factor=0.0)
    c.train.update(steps=60, log_every=10, eval_every=30, checkpoint_every=30, steps_per_call=10)
    return c
