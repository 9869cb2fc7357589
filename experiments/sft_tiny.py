"""SFT of a `tiny` run on docstring -> signature chats (--init=W): a CPU run in a minute."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    c.finetune.update(method="sft", data="stdlib:instructions", max_examples=3000)
    c.data.update(seq_len=128, batch_size=16)
    c.optim.update(lr=1e-3, warmup_steps=10, schedule="cosine", weight_decay=0.0)
    c.train.update(steps=150, log_every=10, eval_every=50, checkpoint_every=50, steps_per_call=10)
    return c
