"""Tiny BPE model on the embedded corpus: a visibly falling loss on a 2-core CPU in minutes."""

from lm.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    c.model.update(num_layers=2, d_model=128, num_heads=4, d_ff=512, max_seq_len=128)
    c.tokenizer.update(kind="bpe", vocab_size=2048)
    c.data.update(source="stdlib", seq_len=128, batch_size=16, max_documents=1500)
    c.optim.update(lr=3e-3, warmup_steps=30)
    c.train.update(steps=300, log_every=10, eval_every=100, checkpoint_every=100, steps_per_call=10)
    return c
