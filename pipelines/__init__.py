"""Named data pipelines: one module per name, each with `get_config()` (see lm/curate/config.py).

`lm data run --pipeline=NAME --output=DIR` runs one; `--config.a.b=value` overrides any key.
"""
