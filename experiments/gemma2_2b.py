"""Gemma 2 2B: 26 layers alternating 4096-token local and global attention, logit soft-capping."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    # Gemma Team 2024 (arXiv:2408.00118), Tables 1-2, and the Hugging Face config of
    # google/gemma-2-2b. The paper counts 2,024,517,888 non-embedding parameters and
    # 590,118,912 embedding parameters for a 256,128-entry table; the released tokenizer (and
    # this config) has 256,000 entries: 2,614,341,888 in all.
    c.model.update(
        vocab_size=256000,
        num_layers=26,
        d_model=2304,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,  # query_pre_attn_scalar 256 = head_dim: the usual 1/sqrt(head_dim)
        d_ff=9216,
        max_seq_len=8192,
        position="rope",
        rope_theta=10000.0,
        norm="rmsnorm",
        norm_eps=1e-6,
        mlp="geglu",  # gelu (tanh approximation) gate
        use_bias=False,
        tie_embeddings=True,
        attention_pattern="LG",  # layer 0 local, layer 1 global, ...
        sliding_window=4096,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        post_norms=True,
        embed_scale=True,
        remat="full",
        loss_chunk=1024,  # never the full [tokens, vocab] logits
        scan_layers=False,  # 26 layers of two kinds; a scan would carry the window as data
    )
    c.tokenizer.update(kind="bpe", vocab_size=256000)
    c.data.update(seq_len=8192, batch_size=512)
    # `lm plan --chips=v5p-256`: 4 micro-batches a step fit 95 GiB of HBM per chip.
    c.optim.update(
        grad_accum_steps=4, lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1
    )
    c.train.update(steps=100000, log_every=10, eval_every=1000, checkpoint_every=1000)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    return c
