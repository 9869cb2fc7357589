"""The names of the training objectives, TF-free (the trainer validates the config with them;
the TF implementations live in data_mixtures/objectives.py, run only by `lm data pack`)."""

from __future__ import annotations

from lm.errors import ConfigError

OBJECTIVES = ("lm", "mlm", "span_corruption")


def validate_objective(objective: str) -> str:
    """`objective` if it is one of OBJECTIVES, else a ConfigError naming the config key."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"--config.data.objective must be one of {OBJECTIVES}, not {objective!r}")
    return objective
