"""The embedded corpus: the Python standard library's source and docs, curated (code filters)."""

from lm.curate.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    c.source.update(type="stdlib", include="*.py,*.txt,*.md,*.rst", exclude="*/site-packages/*")
    # The stdlib's few prose files are READMEs and notes, not web pages: no C4 line filter.
    c.c4.enabled = False
    c.output.num_shards = 4
    return c
