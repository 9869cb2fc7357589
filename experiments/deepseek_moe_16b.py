"""DeepSeekMoE 16B: 64 fine-grained experts top-6 + 2 shared, layer 0 dense; 16.4B, 2.8B active."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    # Dai et al. 2024 and the Hugging Face config of deepseek-ai/deepseek-moe-16b-base: the
    # first layer is dense (d_ff 10944), the other 27 route to 6 of 64 experts of width 1408
    # and always run 2 shared experts of the same width.
    c.model.update(
        vocab_size=102400,
        num_layers=28,
        d_model=2048,
        num_heads=16,
        num_kv_heads=16,
        head_dim=128,
        d_ff=10944,
        max_seq_len=4096,
        position="rope",
        rope_theta=10000.0,
        norm="rmsnorm",
        norm_eps=1e-6,
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=False,
        num_experts=64,
        experts_per_token=6,
        num_shared_experts=2,
        moe_d_ff=1408,
        moe_first_dense=1,
        moe_every=1,
        router="softmax",
        router_norm_topk=False,  # HF norm_topk_prob=False
        moe_dispatch="dropless",
        load_balance_weight=0.001,  # the paper's expert-level balance factor
        router_z_weight=0.0,
        remat="full",
        loss_chunk=1024,  # never the full [tokens, vocab] logits
        scan_layers=False,  # layer 0 is dense: scanned layers must all be alike
    )
    c.tokenizer.update(kind="bpe", vocab_size=102400)
    c.data.update(seq_len=4096, batch_size=1152)  # 4.5M tokens a batch (the paper)
    # `lm plan --chips=v5p-256`: 9 micro-batches of 128 rows a step fit 95 GiB of HBM per chip
    # (XLA:CPU upper bound 91.6 GiB).
    c.optim.update(
        grad_accum_steps=9, lr=4.2e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1
    )
    c.train.update(steps=106449, log_every=10, eval_every=1000, checkpoint_every=1000)
    c.mesh.update(data=1, fsdp=-1, expert=8, tensor=1)
    return c
