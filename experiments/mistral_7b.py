"""Mistral 7B v0.1: 32 layers, width 4096, GQA 32/8, every layer a 4096-token sliding window."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    # Jiang et al. 2023 (arXiv:2310.06825), Table 1, and the Hugging Face config of
    # mistralai/Mistral-7B-v0.1: 7,241,732,096 parameters.
    c.model.update(
        vocab_size=32000,
        num_layers=32,
        d_model=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        max_seq_len=8192,
        position="rope",
        rope_theta=10000.0,
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=False,
        attention_pattern="L",  # every layer local: a rolling 4096-slot cache when decoding
        sliding_window=4096,
        remat="full",
        loss_chunk=1024,  # never the full [tokens, vocab] logits
        scan_layers=True,
    )
    c.tokenizer.update(kind="bpe", vocab_size=32000)
    c.data.update(seq_len=8192, batch_size=512)
    # `lm plan --chips=v5p-256`: 4 micro-batches a step fit 95 GiB of HBM per chip.
    c.optim.update(
        grad_accum_steps=4, lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1
    )
    c.train.update(steps=250000, log_every=10, eval_every=1000, checkpoint_every=1000)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
