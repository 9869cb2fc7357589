"""Llama-3.2-1B: RoPE, RMSNorm, SwiGLU, GQA (32 q / 8 kv heads), tied embeddings; 1.24B params."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    c.model.update(
        vocab_size=0,
        num_layers=16,
        d_model=2048,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        max_seq_len=2048,
        position="rope",
        rope_theta=500000.0,
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=True,
        remat="full",
        scan_layers=True,
    )
    c.tokenizer.update(kind="bpe", vocab_size=128256)
    c.data.update(seq_len=2048, batch_size=256)
    c.optim.update(lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1)
    c.train.update(steps=100000, log_every=10, eval_every=1000, checkpoint_every=1000)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
