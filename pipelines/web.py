"""Web text from WARC/WET archives or JSONL dumps: every prose filter, URL blocklist, dedup."""

from lm.curate.config import default_config


def get_config():
    c = default_config()
    c.description = __doc__.strip()
    # Point at WARC/WET files (or directories / globs of them); for JSONL use
    # --config.source.type=jsonl with text/url fields named by text_field / url_field.
    c.source.update(type="warc", path="", kind="prose")
    # min_score stays the default, calibrated for this identifier (tests/test_curate_langid.py).
    c.langid.update(languages="en")
    c.output.num_shards = 16
    return c
