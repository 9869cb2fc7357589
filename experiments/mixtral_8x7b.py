"""Mixtral 8x7B: 32 layers, width 4096, GQA 32/8, 8 experts top-2; 46.7B total, 12.9B active."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    # Jiang et al. 2024 and the Hugging Face config of mistralai/Mixtral-8x7B-v0.1.
    c.model.update(
        vocab_size=32000,
        num_layers=32,
        d_model=4096,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        max_seq_len=32768,
        position="rope",
        rope_theta=1e6,
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=False,
        sliding_window=0,
        num_experts=8,
        experts_per_token=2,
        moe_d_ff=14336,
        router="softmax",
        router_norm_topk=True,
        moe_dispatch="dropless",
        load_balance_weight=0.02,  # HF router_aux_loss_coef
        router_z_weight=0.0,
        remat="full",
        loss_chunk=1024,  # never the full [tokens, vocab] logits
        scan_layers=True,
    )
    c.tokenizer.update(kind="bpe", vocab_size=32000)
    c.data.update(seq_len=4096, batch_size=1024)
    # `lm plan --chips=v5p-256`: 8 micro-batches a step fit 95 GiB of HBM per chip.
    c.optim.update(
        grad_accum_steps=8, lr=3e-4, warmup_steps=2000, min_lr_ratio=0.1, weight_decay=0.1
    )
    c.train.update(steps=250000, log_every=10, eval_every=1000, checkpoint_every=1000)
    c.mesh.update(data=1, fsdp=-1, expert=8, tensor=1)
    return c
