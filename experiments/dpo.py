"""DPO with the paper's hyper-parameters (Rafailov et al. 2023): beta 0.1, RMSprop-like lr 5e-7
(here AdamW), 150 warmup steps, batch 64; for real checkpoints (--init=W or hf:DIR) and data."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip().splitlines()[0]
    c.finetune.update(method="dpo", data="", eval_fraction=0.02)
    c.finetune.dpo.update(beta=0.1, label_smoothing=0.0)
    c.data.update(seq_len=1024, batch_size=64)
    c.optim.update(
        lr=5e-7, warmup_steps=150, schedule="constant", weight_decay=0.0, clip_norm=10.0,
        spike_factor=0.0,
    )  # fmt: skip
    c.train.update(steps=2000, log_every=10, eval_every=500, checkpoint_every=500)
    return c
