"""Tiny BERT-style masked LM (15% masked, 80/10/10) on the embedded corpus, bidirectional."""

from experiments.tiny import get_config as tiny_config


def get_config():
    c = tiny_config()
    c.description = __doc__.strip()
    c.model.causal = False  # every token sees its whole document
    c.data.objective = "mlm"
    c.tokenizer.extra_ids = 1  # the [MASK] id, after the SentencePiece pieces
    c.train.sample_prompts = ""  # a masked LM does not generate text
    return c
