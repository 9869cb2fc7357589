"""The user-error types. Each carries a one-line message that says what to fix; the CLI prints it
and exits with status 2 instead of a stack trace.

This module imports nothing from `lm`, so any layer (config, data, model, training, serving) can
raise these without an import cycle.
"""


class LMError(ValueError):
    """Base of every user-facing error (a mistake in a config, data, path or checkpoint)."""


class ConfigError(LMError):
    """A user mistake in an experiment name or an override; the message says what to fix."""


class DataError(LMError):
    """A user mistake in the data config or the data itself; the message says what to fix."""


class CheckpointError(LMError):
    """A checkpoint that cannot be used for this config (mismatched tree or shapes)."""


class RequestError(LMError):
    """A generation request the engine cannot run as asked (empty or too-long prompt, a sampling
    parameter out of range); a server answers it with 400 and this message."""


class QueueFull(LMError):
    """The engine's waiting queue is full; a server answers 429 (retry later)."""
