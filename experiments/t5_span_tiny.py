"""Tiny T5-style span corruption (density 0.15, mean span 3) as a decoder-only prefix LM."""

from experiments.tiny import get_config as tiny_config


def get_config():
    c = tiny_config()
    c.description = __doc__.strip()
    # Each row holds [corrupted text with sentinels ; the dropped spans]: the corrupted part is a
    # bidirectional prefix, the loss is on the spans only.
    c.data.objective = "span_corruption"
    c.tokenizer.extra_ids = 16  # sentinel ids; 128-token rows need at most 6
    c.train.sample_prompts = ""
    return c
