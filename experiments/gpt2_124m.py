"""GPT-2 small (124M): 12 layers, 12 heads, width 768, 1024 context, tied embeddings."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    c.model.update(
        vocab_size=0,
        num_layers=12,
        d_model=768,
        num_heads=12,
        d_ff=3072,
        max_seq_len=1024,
        position="learned",
        norm="layernorm",
        mlp="gelu",
        use_bias=True,
        tie_embeddings=True,
        remat="dots",
    )
    c.tokenizer.update(kind="bpe", vocab_size=50304)
    c.data.update(seq_len=1024, batch_size=512)
    c.optim.update(lr=6e-4, warmup_steps=700, min_lr_ratio=0.1, weight_decay=0.1)
    c.train.update(steps=19000, log_every=10, eval_every=250, checkpoint_every=1000)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
