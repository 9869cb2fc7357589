"""Tiny mixture of experts (8 experts, top-2, SwiGLU) on the stdlib: trains on a 2-core CPU."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    # `tiny`'s shape with Mixtral's pieces; each token runs 2 experts of 256, the active width
    # of tiny's d_ff=512 (benchmarks/bench_moe.py compares the two).
    c.model.update(
        num_layers=2,
        d_model=128,
        num_heads=4,
        d_ff=512,
        max_seq_len=128,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        use_bias=False,
        num_experts=8,
        experts_per_token=2,
        moe_d_ff=256,
        router="softmax",
        moe_dispatch="dropless",
        grouped_matmul="tiled",  # XLA:CPU's ragged_dot is a masked matmul per expert: 4-6x slower
        load_balance_weight=0.01,
        router_z_weight=0.001,
    )
    c.tokenizer.update(kind="bpe", vocab_size=2048)
    c.data.update(source="stdlib", seq_len=128, batch_size=16, max_documents=1500)
    c.optim.update(lr=3e-3, warmup_steps=30)
    c.train.update(steps=300, log_every=10, eval_every=100, checkpoint_every=100, steps_per_call=10)
    return c
