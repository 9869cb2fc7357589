"""GPT-3 175B (Brown et al. 2020): 96 layers, width 12288, 96 heads, 2048 context (dense attn)."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    c.model.update(
        vocab_size=50257,
        num_layers=96,
        d_model=12288,
        num_heads=96,
        d_ff=49152,
        max_seq_len=2048,
        position="learned",
        norm="layernorm",
        mlp="gelu",
        use_bias=True,
        tie_embeddings=True,
        remat="full",
        scan_layers=True,
    )
    c.tokenizer.update(kind="bpe", vocab_size=50257)
    # 1536 x 2048 = 3.2M tokens a batch; 300B tokens ~ 95k steps.
    c.data.update(seq_len=2048, batch_size=1536)
    c.optim.update(lr=6e-5, warmup_steps=120, min_lr_ratio=0.1, weight_decay=0.1)
    c.train.update(steps=95000, log_every=10, eval_every=1000, checkpoint_every=1000)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
