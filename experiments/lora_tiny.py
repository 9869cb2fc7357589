"""`sft_tiny` with rank-8 LoRA adapters on attention and MLP projections (base frozen)."""

from experiments import sft_tiny


def get_config():
    c = sft_tiny.get_config()
    c.description = __doc__.strip()
    c.finetune.lora.update(rank=8, alpha=16.0, dropout=0.05)
    c.optim.update(lr=5e-3)
    return c
