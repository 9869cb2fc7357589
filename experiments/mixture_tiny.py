"""Tiny BPE model on a two-source mixture of the embedded corpus (code 70%, text files 30%)."""

from experiments.tiny import get_config as tiny_config
from lm.config import mixture_component


def get_config():
    c = tiny_config()
    c.description = __doc__.strip()
    # Each component is a document source with a sampling rate; point one at an `lm data run`
    # output (source="curated", path=DIR) to mix curated corpora. Rates need not sum to 1.
    c.data.mixture = dict(
        code=mixture_component(c.data, 0.7, source="stdlib", include="*.py"),
        text=mixture_component(c.data, 0.3, source="stdlib", include="*.txt", max_documents=0),
    )
    c.data.source = "mixture"
    return c
