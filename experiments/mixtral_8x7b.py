"""Mixtral 8x7B: 32 layers, width 4096, GQA 32/8, 8 experts top-2; 46.7B total, 12.9B active."""

from experiments import mistral_7b


def get_config():
    # Jiang et al. 2024: "the same modifications as described in [Mistral 7B], with the
    # difference that ... each layer is composed of 8 feedforward blocks" and full 32k
    # attention (the Hugging Face config of mistralai/Mixtral-8x7B-v0.1: no sliding window,
    # rope_theta 1e6, router_aux_loss_coef 0.02).
    c = mistral_7b.get_config()
    c.description = __doc__.strip()
    c.model.update(
        max_seq_len=32768,
        rope_theta=1e6,
        attention_pattern="G",
        sliding_window=0,
        num_experts=8,
        experts_per_token=2,
        moe_d_ff=14336,
        router="softmax",
        router_norm_topk=True,
        moe_dispatch="dropless",
        load_balance_weight=0.02,
        router_z_weight=0.0,
    )
    c.data.update(seq_len=4096, batch_size=1024)
    # `lm plan --chips=v5p-256`: 8 micro-batches a step fit 95 GiB of HBM per chip.
    c.optim.update(grad_accum_steps=8)
    c.train.update(steps=250000)
    c.mesh.update(expert=8)
    return c
