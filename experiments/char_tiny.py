"""Character-level model on any text file (--config.data.path=FILE); nanoGPT's CPU shape."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    # nanoGPT's shakespeare_char CPU quick-start: 4 layers, 4 heads, width 128, context 64.
    c.model.update(num_layers=4, d_model=128, num_heads=4, d_ff=512, max_seq_len=64, dropout=0.0)
    c.tokenizer.update(kind="char", vocab_size=256, byte_fallback=False)
    c.data.update(source="text", seq_len=64, batch_size=12)
    c.optim.update(lr=1e-3, warmup_steps=100, b2=0.99)
    c.train.update(
        steps=2000, log_every=50, eval_every=250, checkpoint_every=500, steps_per_call=10
    )
    c.train.sample_prompts = "\n"
    return c
