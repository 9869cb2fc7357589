"""Named experiments: one module per name, each with `get_config()` (see lm/config.py)."""
